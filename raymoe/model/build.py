"""Construct a model from a ``Config``: dtype, device (``meta`` for shapes only), init, optional FP8."""

from __future__ import annotations

import torch
from torch import nn

from raymoe.config import Config
from raymoe.model.moe import Gate
from raymoe.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_context(config: Config, device: torch.device):
    """Autocast to bf16 when ``precision.dtype=bf16``; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision.dtype == "bf16")


def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) for every projection, embedding and gate; norms start at 1 (their constructor's value)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Gate):
            nn.init.normal_(module.weight, mean=0.0, std=std)


def build_model(config: Config, *, device: str | torch.device = "cpu", seed: int | None = None) -> Transformer:
    """Build the full model. On ``meta`` nothing is allocated.

    Parameters are always fp32: they are the master weights. ``precision.dtype=bf16`` means bf16 *compute*
    (autocast, see ``compute_context``), which is how the paper trains (FP32 master weights, BF16/FP8 GEMMs).

    The same ``seed`` gives the same weights on every process: pipeline workers build the full model and keep
    their stages, which is how distributed runs start bit-identical to the single-process reference.
    """
    device = torch.device(device)
    generator_seed = config.run.seed if seed is None else seed
    with torch.device(device):
        model = Transformer(config.model, config.routing, config.mtp)
    if device.type != "meta":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            init_weights(model, config.model.init_std)
    if config.precision.fp8:
        from raymoe.fp8 import convert_linears

        convert_linears(
            model,
            backend=config.precision.fp8_backend,
            power_of_two_scales=config.precision.fp8_power_of_two_scales,
            promotion_interval=config.precision.fp8_promotion_interval,
        )
    return model
