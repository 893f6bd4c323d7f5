"""What every stage optimizer shares: its interface, its memory report, the pipeline-wide norm, the AdamW it wraps."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from raymoe.config import OptimConfig
from raymoe.train.optim import make_adamw


@dataclass(frozen=True, kw_only=True)
class OptimizerMemory:
    state_bytes: int
    """Adam moments (and step counters) this rank holds."""
    master_bytes: int
    """fp32 master weights the optimizer holds besides the model's own parameters (ZeRO's partition)."""
    grad_bytes: int = 0
    """Gradients held when the last step began, after all backward passes: every parameter's full ``.grad``
    (plain AdamW, ZeRO-1) or the accumulated partition (ZeRO-2: ~1/dp of the former)."""

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.master_bytes


class StageOptimizer(Protocol):
    def after_backward(self) -> None:
        """Called by the executor after every backward pass (B, I, W, an FB's backward) of a step."""
        ...

    def mean_gradients(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """dp-averaged gradients of ``params`` before clipping (parity checks); between the backward and ``step``."""
        ...

    def step(self, lr: float) -> float:
        """Reduce gradients over dp, clip by the global norm, update; returns the global norm before clipping."""
        ...

    def memory(self) -> OptimizerMemory: ...

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this rank's optimizer exactly (safe for ``weights_only`` loads)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Resharding: take this rank's part of full per-parameter AdamW states (``raymoe.checkpoint.reshard``),
        after the parameters themselves were loaded."""
        ...


def pipeline_norm(stage_sq: torch.Tensor, pp_group) -> torch.Tensor:
    """sqrt of the squared stage norms (float64, ``squared_norm``) summed over the pipeline group, in float64."""
    total_sq = stage_sq.detach().to(torch.float64).clone()
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    return total_sq.sqrt()


def replicated_mean_gradients(params: Sequence[nn.Parameter], dp_group) -> list[torch.Tensor]:
    """Copies of the full ``.grad`` of every parameter, averaged over ``dp_group`` (not yet reduced: ZeRO-0/1)."""
    from raymoe.parallel.groups import all_reduce_sum

    for p in params:
        if p.grad is None:  # a parameter no micro-batch reached: its gradient is zero
            p.grad = torch.zeros_like(p)
    grads = [p.grad.detach().clone() for p in params]
    all_reduce_sum(grads, dp_group)
    scale = 1.0 / (1 if dp_group is None else dist.get_world_size(dp_group))
    return [g * scale for g in grads]


def held_grad_bytes(params: Collection[nn.Parameter]) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def stage_adamw(module: nn.Module, optim: OptimConfig, bf16_moments: bool = False) -> torch.optim.Optimizer:
    # The reference's groups (decay matrices, not vectors) and hyper-parameters, so the update is the same;
    # ``bf16_moments`` is precision.bf16_optimizer_states (BF16 Adam moments, FP32 master weights).
    return make_adamw(module.named_parameters(), optim, bf16_moments=bf16_moments)
