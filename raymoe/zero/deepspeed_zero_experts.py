"""The optimizer of a rank's expert shard under expert parallelism: DeepSpeed ZeRO-1 over the expert-data-parallel
group, or plain AdamW when the shard has no replica. ``DeepSpeedZero`` (``deepspeed_zero.py``) owns one beside
its dense partition and steps both with one global norm; the DeepSpeed module is handed in, never imported."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raymoe.checkpoint.reshard import adamw_shard_state, load_adamw_param_states, load_adamw_shard_state
from raymoe.config import OptimConfig
from raymoe.fp8 import optimizer_state_bytes
from raymoe.parallel.groups import grad_or_zeros
from raymoe.train.clip import clip_coefficient, squared_norm
from raymoe.train.optim import make_adamw, set_lr
from raymoe.zero.common import ExpertSplit
from raymoe.zero.deepspeed_zero_partition import (
    StageMpu,
    load_zero_param_states,
    load_zero_partition_state,
    partition_grads,
    reduce_at_step,
    setup_buckets,
    step_reduced,
    zero_partition_state,
)


class Holder(nn.Module):
    """A module that only *holds* some of a stage's parameters, for a DeepSpeed engine that partitions them: the
    executor runs the stage itself, never this module."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self.held = nn.ParameterList([p for _, p in named])

    def forward(self, *args):  # pragma: no cover - never called
        raise RuntimeError("a parameter holder has no forward")


class ExpertPart:
    """The optimizer of this rank's expert shard: ZeRO-1 over the expert-data-parallel group (DeepSpeed), or plain
    AdamW when the shard has no replica (edp = 1). Its gradients are scaled to the dense parameters' 1/dp."""

    def __init__(self, deepspeed, named: list[tuple[str, nn.Parameter]], optim: OptimConfig,
                 experts: ExpertSplit, ds_config: dict, bf16_moments: bool) -> None:
        self.params = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.name_of = {id(p): n for n, p in named}
        self.experts = experts
        self.max_norm = optim.grad_clip
        if experts.edp_group is None:
            self.engine = self.zero = None
            self.adamw = make_adamw(named, optim, bf16_moments=bf16_moments)
        else:
            self.adamw = None
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=Holder(named), optimizer=make_adamw(named, optim, bf16_moments=bf16_moments),
                config=ds_config, mpu=StageMpu(experts.edp_group), dist_init_required=False,
            )
            self.zero.scaled_global_norm = lambda norm_type=2: self._norm
            self.zero.unscale_and_clip_grads = self._clip
        self._norm = torch.zeros((), dtype=torch.float64)

    def _clip(self, grad_groups_flat, total_norm) -> None:
        if self.max_norm > 0:
            coef = clip_coefficient(total_norm, self.max_norm)
            for g in grad_groups_flat:
                g.mul_(coef.to(g.device, g.dtype))

    def reduce(self) -> None:
        """Sum over the expert-data-parallel group and scale by 1/dp (ZeRO divides by edp itself: pre-scale by
        edp / dp = 1 / ep)."""
        for p in self.params:  # an idle expert: a zero gradient keeps every replica's optimizer in step
            grad_or_zeros(p)
        if self.zero is None:
            for p in self.params:
                p.grad.div_(self.experts.dp_size)
            return
        edp = dist.get_world_size(self.experts.edp_group)
        for p in self.params:
            p.grad.mul_(edp / self.experts.dp_size)
        setup_buckets(self.zero)
        reduce_at_step(self.engine)

    def partition_sq(self) -> torch.Tensor:
        """Squares of this rank's piece of the expert gradients: its ZeRO partition, or its whole shard."""
        if self.zero is not None:
            return squared_norm(partition_grads(self.zero), device=self.zero.device)
        counted = (p.grad for p in self.params if not getattr(p, "ds_pipe_replicated", False))
        return squared_norm(counted, device=self.params[0].device if self.params else "cpu")

    def step(self, lr: float, total_norm: torch.Tensor) -> None:
        if self.zero is not None:
            self._norm = total_norm
            set_lr(self.zero.optimizer, lr)
            step_reduced(self.engine)
            return
        if self.max_norm > 0:
            coef = clip_coefficient(total_norm, self.max_norm)
            for p in self.params:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        set_lr(self.adamw, lr)
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)

    def master_bytes(self) -> int:
        if self.zero is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.zero.single_partition_of_fp32_groups)

    def state_bytes(self) -> int:
        return optimizer_state_bytes(self.zero.optimizer if self.zero is not None else self.adamw)

    def state_dict(self) -> dict:
        if self.zero is not None:
            return zero_partition_state(self.zero, self.name_of)
        return adamw_shard_state(self.adamw, self.names)

    def load_state_dict(self, state: dict) -> None:
        if self.zero is not None:
            load_zero_partition_state(self.zero, state)
        else:
            load_adamw_shard_state(self.adamw, state, source="expert shard")

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.zero is not None:
            load_zero_param_states(self.zero, self.name_of, states)
        else:
            load_adamw_param_states(self.adamw, self.names, states)
