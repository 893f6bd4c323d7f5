"""Optimizer pieces shared by the single-process reference and the distributed workers.

Both must build *identical* parameter groups and learning rates, or parity is lost before the first step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from raymoe.config import OptimConfig


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], optim: OptimConfig) -> list[dict]:
    """Matrices (projections, experts, embedding, gates) decay; vectors (norm weights) do not."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def make_adamw(
    named_params: Iterable[tuple[str, nn.Parameter]], optim: OptimConfig, *, bf16_moments: bool = False
) -> torch.optim.Optimizer:
    """torch AdamW, or with ``bf16_moments`` (``precision.bf16_optimizer_states``) AdamW whose two moments are
    stored in BF16 while the master weights and the update stay FP32 (the paper's choice)."""
    groups = param_groups(named_params, optim)
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    if bf16_moments:
        from raymoe.fp8 import Bf16MomentAdamW

        return Bf16MomentAdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``.

    ``step`` is 0-based: the learning rate used by the optimizer step that ends step ``step``.
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
