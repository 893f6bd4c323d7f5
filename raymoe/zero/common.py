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


def replicated_mean_gradients(params: Sequence[nn.Parameter], dp_group, experts: ExpertSplit | None = None
                               ) -> list[torch.Tensor]:
    """Copies of the full ``.grad`` of every parameter, averaged over ``dp_group`` (not yet reduced: ZeRO-0/1);
    routed-expert gradients summed over their expert-data-parallel group instead, with the same 1/dp."""
    from raymoe.parallel.groups import all_reduce_sum, grad_or_zeros

    grads = [grad_or_zeros(p).detach().clone() for p in params]
    is_expert = [experts is not None and experts.holds(p) for p in params]
    all_reduce_sum([g for g, e in zip(grads, is_expert) if not e], dp_group)
    if experts is not None:
        all_reduce_sum([g for g, e in zip(grads, is_expert) if e], experts.edp_group)
    scale = 1.0 / (1 if dp_group is None else dist.get_world_size(dp_group))
    return [g * scale for g in grads]


@dataclass(frozen=True, kw_only=True)
class ExpertSplit:
    """Expert parallelism as the optimizers see it: which parameters are routed experts (this rank's shard), and
    the groups they reduce over. Dense parameters average over the stage's dp group; an expert parameter exists
    on the ``edp = dp / ep`` ranks of its expert-data-parallel group only, each of which saw gradients from all
    ``ep`` token sources, so it is summed over ``edp_group`` and scaled by the same 1/dp (DeepSpeed and Megatron
    do the same). In the global norm every expert element is counted once: summing the squares over the ``ep``
    group (local twin: each rank holds other experts) or over the dp group (ZeRO: each rank holds another
    partition of them) covers each element exactly once."""

    params: tuple[nn.Parameter, ...]
    ep_group: object
    edp_group: object
    dp_size: int
    ids: frozenset[int] = frozenset()

    def holds(self, p: nn.Parameter) -> bool:
        return id(p) in self.ids

    @staticmethod
    def of(expert_params: Collection[nn.Parameter], *, ep_group, edp_group, dp_group) -> ExpertSplit | None:
        if not expert_params:
            return None
        return ExpertSplit(params=tuple(expert_params), ep_group=ep_group, edp_group=edp_group,
                           dp_size=1 if dp_group is None else dist.get_world_size(dp_group),
                           ids=frozenset(id(p) for p in expert_params))


def held_grad_bytes(params: Collection[nn.Parameter]) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def stage_adamw(module: nn.Module, optim: OptimConfig, bf16_moments: bool = False) -> torch.optim.Optimizer:
    # The reference's groups (decay matrices, not vectors) and hyper-parameters, so the update is the same;
    # ``bf16_moments`` is precision.bf16_optimizer_states (BF16 Adam moments, FP32 master weights).
    return make_adamw(module.named_parameters(), optim, bf16_moments=bf16_moments)
