"""Construct a model from a ``Config``: shapes on ``meta``, then shard-safe initialisation, optional FP8.

**Shard-safe init.** Every parameter draws its initial values from its own random stream, seeded by the run seed
and the parameter's model name (``layers.3.ffn.experts.12.w1.weight``: routed experts by *global* id). A worker
can therefore build its pipeline stage(s) and its expert shard on ``meta`` (nothing allocated), and materialise
only what it holds, bit-identical to the same tensors of the single-process reference -- no process ever builds
the whole model (which stops working at the ``16b`` preset). One stream per parameter also makes a parameter's
initial value independent of which other parameters exist, so adding an MTP depth does not move the embedding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from raymoe.config import Config
from raymoe.model.layers import RMSNorm
from raymoe.model.moe import Gate
from raymoe.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_context(config: Config, device: torch.device):
    """Autocast to bf16 when ``precision.dtype=bf16``; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision.dtype == "bf16")


def parameter_seed(run_seed: int, name: str) -> int:
    """The seed of parameter ``name``'s own random stream (a stable hash: the same in every process)."""
    digest = hashlib.sha256(f"{run_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_value(module: nn.Module, key: str, name: str, like: torch.Tensor, *, std: float, run_seed: int,
                  device: torch.device) -> torch.Tensor:
    """The initial value of ``module``'s parameter ``key`` (model name ``name``): Normal(0, std) for projections,
    embeddings and gates, 1 for norms. Drawn on the CPU from the parameter's own stream, then moved, so a GPU
    worker starts from the same bits as a CPU one."""
    if isinstance(module, RMSNorm):
        return torch.ones(like.shape, dtype=like.dtype, device=device)
    if isinstance(module, (nn.Linear, nn.Embedding, Gate)) and key == "weight":
        generator = torch.Generator().manual_seed(parameter_seed(run_seed, name))
        value = torch.empty(like.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        return value.to(device=device, dtype=like.dtype)
    raise AssertionError(f"no initialisation rule for parameter {name} of {type(module).__name__}")


@torch.no_grad()
def materialize(module: nn.Module, *, device: str | torch.device, std: float, run_seed: int) -> nn.Module:
    """Give every ``meta`` parameter and buffer of ``module`` its real, initial value on ``device``, in place.

    Parameter names are ``module``'s own: a pipeline stage names its parameters as the full model does, so a
    stage materialises exactly the reference's tensors. A parameter shared by two modules (the embedding a
    stage's first and last chunks both use) is created once and stays shared.
    """
    device = torch.device(device)
    name_of = {id(p): n for n, p in module.named_parameters()}
    made: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        for key, param in list(owner._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                value = initial_value(owner, key, name_of[id(param)], param, std=std, run_seed=run_seed,
                                      device=device)
                made[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            owner._parameters[key] = made[id(param)]
        for key, buffer in list(owner._buffers.items()):
            if buffer is not None and buffer.is_meta:  # the gates' balancing bias: routing state, starts at 0
                owner._buffers[key] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
    return module


def build_model(config: Config, *, device: str | torch.device = "cpu", seed: int | None = None,
                expert_ids: Sequence[int] | None = None) -> Transformer:
    """Build the model (routed experts: ``expert_ids``, default all). On ``meta`` nothing is allocated.

    Parameters are always fp32: they are the master weights. ``precision.dtype=bf16`` means bf16 *compute*
    (autocast, see ``compute_context``), which is how the paper trains (FP32 master weights, BF16/FP8 GEMMs).
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config.model, config.routing, config.mtp, expert_ids=expert_ids)
    if device.type != "meta":
        materialize(model, device=device, std=config.model.init_std,
                    run_seed=config.run.seed if seed is None else seed)
    return convert_for_precision(model, config)


def convert_for_precision(module: nn.Module, config: Config) -> nn.Module:
    """FP8 linears where ``precision.fp8`` asks for them (after materialising: they reuse the weights), and FP8
    token dispatch where ``precision.fp8_dispatch`` does."""
    if config.precision.fp8_dispatch:
        from raymoe.model.dispatch import LocalDispatcher
        from raymoe.model.moe import MoE

        for moe in (m for m in module.modules() if isinstance(m, MoE)):
            moe.dispatcher = LocalDispatcher(fp8=True, fp8_power_of_two=config.precision.fp8_power_of_two_scales)
    if config.precision.fp8:
        from raymoe.fp8 import convert_linears

        convert_linears(
            module,
            backend=config.precision.fp8_backend,
            power_of_two_scales=config.precision.fp8_power_of_two_scales,
            promotion_interval=config.precision.fp8_promotion_interval,
        )
    return module
