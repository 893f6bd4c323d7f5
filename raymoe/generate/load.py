"""Load a trained model for inference from whatever a run produced: a run directory (its newest checkpoint), a
``checkpoint export`` safetensors file, or a Hugging Face model directory (``--format hf``, or transformers')."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from raymoe.config import Config
from raymoe.model.transformer import Transformer


@dataclass(frozen=True)
class LoadedModel:
    model: Transformer
    """Routing biases set, eval mode, fp32 parameters."""
    config: Config
    step: int
    source: str


def load_model(source: str | Path) -> LoadedModel:
    from raymoe.checkpoint import copy_parameters
    from raymoe.checkpoint.export import BIAS
    from raymoe.interop.hf_import import is_hf_dir
    from raymoe.model import build_model

    source = str(source)
    if is_hf_dir(source):
        config, step, tensors = _from_hf(source)
    elif source.endswith(".safetensors"):
        config, step, tensors = _from_export(source)
    else:
        config, step, tensors = _from_run(source)
    model = build_model(config)
    bias_RE = tensors.pop(BIAS)
    copy_parameters(dict(model.named_parameters()), tensors, source=source)
    model.set_routing_biases(bias_RE.float())
    return LoadedModel(model=model.eval(), config=config, step=step, source=source)


def _from_hf(source: str) -> tuple[Config, int, dict[str, torch.Tensor]]:
    from raymoe.checkpoint.export import BIAS
    from raymoe.interop.hf_import import check_hf_dir, open_dir, read_hf_tensors
    from raymoe.model import build_model

    directory = open_dir(source)
    config = directory.config()
    check_hf_dir(source, config)
    names = [n for n, _ in build_model(config, device="meta").named_parameters()]
    return config, int(directory.metadata.get("raymoe_step", 0)), read_hf_tensors(source, [*names, BIAS])


def _from_export(source: str) -> tuple[Config, int, dict[str, torch.Tensor]]:
    from raymoe.checkpoint.export import load_export
    from raymoe.config import config_from_yaml

    tensors, metadata = load_export(Path(source))
    if "raymoe_config" not in metadata:
        raise ValueError(f"{source!r} has no raymoe_config in its header: not a `raymoe checkpoint export` file")
    return config_from_yaml(metadata["raymoe_config"], ()), int(metadata.get("raymoe_step", 0)), tensors


def _from_run(source: str) -> tuple[Config, int, dict[str, torch.Tensor]]:
    from raymoe.checkpoint import resolve_checkpoint
    from raymoe.checkpoint.compat import config_of
    from raymoe.checkpoint.export import BIAS, consolidate

    checkpoint = resolve_checkpoint(source)
    tensors, manifest = consolidate(checkpoint)
    tensors[BIAS] = torch.tensor(manifest.routing_bias_RE, dtype=torch.float32)
    return config_of(manifest), manifest.step, tensors
