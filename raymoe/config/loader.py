"""YAML presets + dotlist overrides -> a validated, frozen ``Config`` (omegaconf structured configs)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raymoe.config.schema import Config

PRESETS = ("debug", "small", "16b", "236b", "671b")


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return Path(str(resources.files("raymoe.config") / "presets" / f"{name}.yaml"))


def load_config(
    preset: str | None = "small",
    overrides: Sequence[str] = (),
    config_file: str | Path | None = None,
) -> Config:
    """Merge schema defaults <- preset <- config file <- ``key=value`` overrides, then validate.

    A config file may name its own base with a top-level ``preset: NAME`` key.
    """
    base = OmegaConf.structured(Config)
    layers = []
    file_conf = None
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            file_conf = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors and the like: name the file, one line
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {_first_line(exc)}") from exc
        if not isinstance(file_conf, DictConfig):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got a list")
        file_preset = file_conf.pop("preset", None)
        if file_preset is not None:
            preset = str(file_preset)
    if preset:
        layers.append(OmegaConf.load(preset_path(preset)))
    if file_conf is not None:
        layers.append(file_conf)
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    for override in overrides:  # one by one: merged, a later `run.out_dir=x` would hide an earlier `run=1`
        try:
            single = OmegaConf.from_dotlist([override])
        except Exception as exc:  # omegaconf's or YAML's parser, e.g. an unbalanced bracket in a value
            key, value = override.split("=", 1)
            raise ValueError(f"{key}: cannot parse the value {value!r}: {_first_line(exc)}") from exc
        check_types(OmegaConf.to_container(single))
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    for layer in layers[:-1]:
        check_types(OmegaConf.to_container(layer))
    try:
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        # omegaconf's messages carry the value; put the full key first, as every other config error does.
        raise ValueError(f"{getattr(exc, 'full_key', None) or '?'}: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).split("\n")[0].strip()


def check_types(layer: object) -> None:
    """Refuse what omegaconf would coerce or misreport: unknown keys (with the closest known one), a section
    given a value (``model=1``), and booleans written as anything but a YAML boolean (omegaconf turns ``2`` into
    True). Integer, float and string fields are converted, and refused by name, by omegaconf."""
    if not isinstance(layer, dict):
        raise ValueError(f"a config file must hold a mapping of sections, got {type(layer).__name__}")
    sections = _schema()
    for section, values in layer.items():
        section = str(section)
        if section not in sections:
            raise ValueError(f"unknown key {section!r}{_did_you_mean(section, sections)}; the sections are "
                             f"{sorted(sections)}")
        known = sections[section]
        if not isinstance(values, dict):
            example = next(iter(known))
            raise ValueError(f"{section}={values!r}: {section} is a section of settings, not a value; set its "
                             f"fields instead, e.g. {section}.{example}=...")
        for key, value in values.items():
            full = f"{section}.{key}"
            if key not in known:
                raise ValueError(f"unknown key {full!r}{_did_you_mean(str(key), known, section)}; {section} has "
                                 f"{sorted(known)}")
            _check_leaf(full, known[key], value)


def _check_leaf(key: str, kind: str, value: object) -> None:
    if isinstance(value, str) and "${" in value:  # an interpolation; omegaconf resolves and converts it
        return
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if kind in ("int", "float") and isinstance(value, (bool, dict, list)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if kind == "str" and isinstance(value, (dict, list)):
        raise ValueError(f"{key} must be a string, got {value!r}")
    if kind.startswith("list") and not isinstance(value, list):
        raise ValueError(f"{key} must be a list like [2,2], got {value!r}")
    if kind == "list[int]" and any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"{key} must list integers, got {value!r}")


@functools.cache
def _schema() -> dict[str, dict[str, str]]:
    """Section -> field -> type name (``int``, ``float``, ``bool``, ``str``, ``list[int]``), from the dataclasses."""
    return {
        section.name: {f.name: str(f.type) for f in dataclasses.fields(_section_class(section.name))}
        for section in dataclasses.fields(Config)
    }


def _section_class(name: str) -> type:
    return type(getattr(Config(), name))


def _did_you_mean(name: str, known, section: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    prefix = f"{section}." if section else ""
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def config_from_yaml(text: str, overrides: Sequence[str] = ()) -> Config:
    """A config saved with ``to_yaml`` (a run directory's config.yaml, a checkpoint manifest), plus overrides."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        return load_config(None, overrides, path)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(asdict(config)))


def to_dict(config: Config) -> dict:
    return asdict(config)
