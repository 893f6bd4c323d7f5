"""The local twin of ZeRO: ``LocalAdamW`` (dp = 1, or ``zero_stage=0`` with a dp all-reduce) is plain torch AdamW
with the same pipeline-wide clipping; it never imports DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from raymoe.checkpoint.reshard import (
    adamw_shard_state,
    load_adamw_param_states,
    load_adamw_shard_state,
    position_names,
)
from raymoe.config import OptimConfig
from raymoe.fp8 import optimizer_state_bytes
from raymoe.train.clip import clip_coefficient, squared_norm
from raymoe.train.optim import set_lr
from raymoe.zero.common import (
    ExpertSplit,
    OptimizerMemory,
    held_grad_bytes,
    pipeline_norm,
    replicated_mean_gradients,
    stage_adamw,
)


class LocalAdamW:
    """torch AdamW on this rank's parameters; gradients averaged over ``dp_group`` (if any) by all-reduce, routed
    experts (``experts``, expert parallelism) over their expert-data-parallel group with the same 1/dp."""

    def __init__(
        self, module: nn.Module, optim: OptimConfig, *, dp_group, pp_group, not_in_norm=(), bf16_moments: bool = False,
        experts: ExpertSplit | None = None,
    ) -> None:
        self.optim = optim
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.dp_group = dp_group
        self.pp_group = pp_group
        self.experts = experts
        skip = {id(p) for p in not_in_norm}
        self.norm_params = [p for p in self.params if id(p) not in skip]
        self.optimizer = stage_adamw(module, optim, bf16_moments)
        self.names = position_names(self.optimizer, module.named_parameters())
        self._grad_bytes = 0

    def after_backward(self) -> None:
        pass  # gradients stay on the parameters until the step

    def mean_gradients(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        return replicated_mean_gradients(params, self.dp_group, self.experts)

    def step(self, lr: float) -> float:
        from raymoe.parallel.groups import all_reduce_sum, grad_or_zeros

        self._grad_bytes = held_grad_bytes(self.params)
        experts = self.experts
        if experts is not None:  # idle experts still take part in the reductions: a zero gradient, not None
            for p in experts.params:
                grad_or_zeros(p)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.dp_group is not None:
            is_expert = [experts is not None and experts.holds(p) for p in self.params if p.grad is not None]
            all_reduce_sum([g for g, e in zip(grads, is_expert) if not e], self.dp_group)
            if experts is not None:
                all_reduce_sum([g for g, e in zip(grads, is_expert) if e], experts.edp_group)
            for g in grads:
                g.div_(dist.get_world_size(self.dp_group))
        device = self.params[0].device if self.params else "cpu"
        if experts is None:
            stage_sq = squared_norm((p.grad for p in self.norm_params if p.grad is not None), device=device)
        else:  # dense gradients are replicated over dp, expert shards differ over ep: sum their squares over ep
            norm = [p for p in self.norm_params if p.grad is not None]
            stage_sq = squared_norm((p.grad for p in norm if not experts.holds(p)), device=device)
            expert_sq = squared_norm((p.grad for p in norm if experts.holds(p)), device=device)
            if experts.ep_group is not None:
                dist.all_reduce(expert_sq, group=experts.ep_group)
            stage_sq = stage_sq + expert_sq
        total = pipeline_norm(stage_sq, self.pp_group)
        if self.optim.grad_clip > 0:
            coef = clip_coefficient(total, self.optim.grad_clip)
            for g in grads:
                g.mul_(coef.to(g.device, g.dtype))
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)

    def memory(self) -> OptimizerMemory:
        return OptimizerMemory(
            state_bytes=optimizer_state_bytes(self.optimizer), master_bytes=0, grad_bytes=self._grad_bytes
        )

    def state_dict(self) -> dict:
        """AdamW's moments and step counts (tensors and plain containers: loadable with ``weights_only``)."""
        return adamw_shard_state(self.optimizer, self.names)

    def load_state_dict(self, state: dict) -> None:
        load_adamw_shard_state(self.optimizer, state)

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        load_adamw_param_states(self.optimizer, self.names, states)
