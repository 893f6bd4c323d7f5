"""YAML presets + dotlist overrides -> a validated, frozen ``Config`` (omegaconf structured configs)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf
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
        file_conf = OmegaConf.load(path)
        file_preset = file_conf.pop("preset", None)
        if file_preset is not None:
            preset = str(file_preset)
    if preset:
        layers.append(OmegaConf.load(preset_path(preset)))
    if file_conf is not None:
        layers.append(file_conf)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        # omegaconf's messages carry the full key and value; re-raise as the ValueError users expect.
        raise ValueError(str(exc).split("\n    full_key")[0] + f" (key: {getattr(exc, 'full_key', '?')})") from exc


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
