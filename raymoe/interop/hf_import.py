"""Read a Hugging Face DeepSeek-V3 directory as our parameters: ``run.init_from`` accepts one.

``raymoe.checkpoint.export.check_export`` / ``read_tensors`` hand a directory here, so every trainer (the Ray
workers, each reading only its stage's tensors, and the single-process one) starts from it unchanged. Accepted:
our own ``--format hf`` exports and directories written by transformers' ``save_pretrained`` (per-expert tensors,
or experts stacked as ``gate_up_proj`` / ``down_proj``; one file or a sharded index).

The MTP module has no place in transformers' model. A directory that holds it (ours, or the released layout at
layer ``num_layers + k``) provides it; otherwise MTP parameters start fresh from the model's own init (seeded
by ``run.seed`` of the directory's config and each parameter's name, so every worker builds the same values),
and say so on stderr.
"""

from __future__ import annotations

import json
import re
import sys
from functools import lru_cache
from pathlib import Path

import torch

from raymoe.interop.hf_config import check_matches, overrides_from_hf
from raymoe.interop.hf_names import bias_name, hf_name, is_mtp_projection, swap_halves

BIAS = "routing_bias_RE"  # the name raymoe.checkpoint.export gives the routing state (kept in step with it)


def is_hf_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


class HfDir:
    """A model directory: its config.json, and which file holds each tensor (read lazily, header first)."""

    def __init__(self, path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.source = f"Hugging Face model directory {str(self.path)!r}"
        try:
            self.hf = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.source}: config.json is not readable JSON: {exc}") from None
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.path / "model.safetensors").is_file():
            files = [f for f in ("model.safetensors", "mtp.safetensors") if (self.path / f).is_file()]
        else:
            raise ValueError(f"{self.source} has no model.safetensors (or index); only safetensors are read")
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            with safe_open(str(self.path / file), framework="pt") as f:
                self.metadata.update(f.metadata() or {})
                for key in f.keys():
                    self.file_of[key] = file
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / self.file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    @property
    def num_layers(self) -> int:
        return int(self.hf["num_hidden_layers"])

    def config(self):
        """Our ``Config`` of this model: the exporting run's (in the header) or one built from config.json."""
        from raymoe.config import config_from_yaml, load_config

        if "raymoe_config" in self.metadata:
            return config_from_yaml(self.metadata["raymoe_config"], ())
        seq_len = min(128, int(self.hf.get("max_position_embeddings", 128)))
        return load_config(None, [*overrides_from_hf(self.hf), f"data.seq_len={seq_len}"])

    # -- our names ------------------------------------------------------------------------------------------------
    def source_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of our tensor ``name`` as this directory stores it; None if absent."""
        key = hf_name(name, self.num_layers)
        if key in self.shapes:
            return self.shapes[key]
        if stacked := self._stacked(key):
            shape = self.shapes[stacked[0]]
            return shape[1:] if stacked[1] is None else (shape[1] // 2, shape[2])
        return None

    def _stacked(self, key: str) -> tuple[str, int | None, int] | None:
        """(stacked key, half (0 gate, 1 up, None), expert) for a per-expert key stored stacked."""
        m = re.fullmatch(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key)
        if m is None:
            return None
        if m[3] == "down_proj" and f"{m[1]}.down_proj" in self.shapes:
            return f"{m[1]}.down_proj", None, int(m[2])
        if m[3] != "down_proj" and f"{m[1]}.gate_up_proj" in self.shapes:
            return f"{m[1]}.gate_up_proj", int(m[3] == "up_proj"), int(m[2])
        return None

    def tensor(self, name: str) -> torch.Tensor | None:
        key = hf_name(name, self.num_layers)
        if key in self.file_of:
            value = self.get(key)
        elif stacked := self._stacked(key):
            whole, half, expert = stacked
            value = self.get(whole)[expert]
            value = value if half is None else value.chunk(2, dim=0)[half]
        else:
            return None
        return swap_halves(value) if is_mtp_projection(name) else value


_mtp_depth_checked: dict[str, int] = {}
"""The MTP depth of the config each directory was last checked against: the routing state read right after it
(``read_tensors(path, [BIAS])``, which gets no config) must have that config's number of routers."""


def open_dir(path: str) -> HfDir:
    return HfDir(path)  # headers only: cheap enough to reread, and never stale after a re-export


def check_hf_dir(path, config) -> None:
    """Before any worker starts: the directory is ``config``'s model (config.json fields, tensor names and
    shapes); MTP tensors may be absent (they start fresh)."""
    from raymoe.model import build_model

    d = open_dir(str(Path(path).resolve()))
    check_matches(d.hf, config, source=d.source)
    _mtp_depth_checked[str(d.path.resolve())] = config.mtp.depth
    for name, param in build_model(config, device="meta").named_parameters():
        shape = d.source_shape(name)
        if shape is None and not name.startswith("mtp."):
            raise ValueError(f"{d.source} has no tensor {hf_name(name, d.num_layers)} (our {name})")
        if shape is not None and tuple(shape) != tuple(param.shape):
            raise ValueError(f"{d.source}: {hf_name(name, d.num_layers)} has shape {tuple(shape)}, "
                             f"the model's {name} is {tuple(param.shape)}")


def read_hf_tensors(path, names) -> dict[str, torch.Tensor]:
    """Our tensors ``names`` (parameters, or ``BIAS`` for the routing state) from the directory at ``path``."""
    d = open_dir(str(Path(path).resolve()))
    out: dict[str, torch.Tensor] = {}
    fresh = []
    for name in names:
        if name == BIAS:
            out[name] = _biases(d)
        elif (value := d.tensor(name)) is not None:
            out[name] = value.float()
        elif name.startswith("mtp."):
            out[name] = _fresh_mtp(str(d.path.resolve()), (d.path / "config.json").stat().st_mtime_ns)[name]
            fresh.append(name)
        else:
            raise ValueError(f"{d.source} has no tensor {hf_name(name, d.num_layers)} (our {name})")
    if fresh:
        print(f"{d.source} holds no MTP module: {len(fresh)} MTP parameters start from a fresh init",
              file=sys.stderr)
    return out


def _biases(d: HfDir) -> torch.Tensor:
    """(routers, experts) routing state: each router's e_score_correction_bias (zeros where absent: MTP)."""
    from raymoe.model.transformer import router_slots

    config = d.config()
    depth = _mtp_depth_checked.get(str(d.path.resolve()), config.mtp.depth)
    rows = []
    for layer_id in router_slots(config.model, depth):
        key = bias_name(layer_id)
        rows.append(d.get(key).float() if key in d.file_of else torch.zeros(config.model.num_routed_experts))
    return torch.stack(rows)


@lru_cache(maxsize=2)
def _fresh_mtp(path: str, stamp: int) -> dict[str, torch.Tensor]:
    """Every MTP parameter, initialised once per directory version (``stamp``) and process, with the values the
    model's own shard-safe init gives them (each parameter's stream is seeded by the run seed and its name)."""
    from torch import nn

    from raymoe.model.build import materialize
    from raymoe.model.mtp import MTPModule

    config = open_dir(path).config()
    holder = nn.Module()  # so that parameters are named mtp.{k}.*, as in the full model
    with torch.device("meta"):
        holder.mtp = nn.ModuleList(MTPModule(config.model, config.routing, moe_slot=config.model.num_layers + k)
                                   for k in range(max(config.mtp.depth, 1)))
    materialize(holder, device="cpu", std=config.model.init_std, run_seed=config.run.seed)
    return {name: p.detach() for name, p in holder.named_parameters()}
