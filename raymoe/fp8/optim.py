"""AdamW with BF16 moments and FP32 master weights (DeepSeek-V3 section 3.3.3, "low-precision optimizer states").

Adam keeps two moments per parameter; in float32 that is 8 bytes per parameter, twice the weights themselves.
The paper stores both moments in BF16 (4 bytes) and observes no loss degradation, while the parameters (the
"master weights") and the arithmetic of the update stay float32. Each step here loads the BF16 moments, updates
them in float32, stores them back rounded to nearest BF16, and applies the float32 moments to the float32
parameter -- what a fused kernel does, with the same decoupled weight decay and bias correction as
``torch.optim.AdamW``.

Caveat (why the paper's beta2 = 0.95 matters): BF16 keeps 8 significant bits, so a moment stops moving once one
step changes it by less than half a unit in the last place, i.e. relative change below ~2^-9. With
beta2 = 0.95 (5% per step) that never bites; with beta2 >= ~0.996 the second moment of a parameter whose
gradients shrink can stall at a stale value.

It is a plain ``torch.optim.Optimizer`` with ``param_groups``, so DeepSpeed's ZeRO can wrap it like AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

MOMENT_DTYPE = torch.bfloat16


class Bf16MomentAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` semantics; ``exp_avg`` and ``exp_avg_sq`` are stored in bfloat16."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        # torch's load_state_dict casts floating state to the parameter's dtype (float32): cast the moments back.
        self.register_load_state_dict_post_hook(_moments_to_bf16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("Bf16MomentAdamW does not support sparse gradients")
                self._update(p, self.state[p], beta1, beta2, lr, eps, weight_decay)
        return loss

    @staticmethod
    def _update(p, state, beta1: float, beta2: float, lr: float, eps: float, weight_decay: float) -> None:
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=MOMENT_DTYPE, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=MOMENT_DTYPE, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        grad = p.grad.float()
        exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].copy_(exp_avg)  # round to nearest bf16: what is kept between steps
        state["exp_avg_sq"].copy_(exp_avg_sq)
        p.mul_(1 - lr * weight_decay)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p.addcdiv_(exp_avg.to(p.dtype), denom.to(p.dtype), value=-lr / bias_correction1)


def _moments_to_bf16(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and state[key].dtype != MOMENT_DTYPE:
                state[key] = state[key].to(MOMENT_DTYPE)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments and step counters)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
