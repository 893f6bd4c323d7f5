"""Global gradient-norm clipping: one definition that the reference and every distributed layout compute alike.

The clip factor ``min(1, max_norm / (||g|| + 1e-6))`` (``torch.nn.utils.clip_grad_norm_``'s) multiplies every
gradient element, so its last fp32 bit reaches the whole update: AdamW's first step ``lr * g / (|g| + eps)``
cancels the scale of g, but where the updated weight is large (RMSNorm weights start at 1.0) a 1-ulp change of
the factor flips ulps of the weight, and one such flip is ~1e-5 of a norm weight's first update.

The norm itself is a sum over the whole model's gradients, and a layout sums it in its own order: per ZeRO
partition (which cuts tensors at partition boundaries), per dp rank, per pipeline stage, then across ranks.
Summed in fp32, as torch does and DeepSpeed does between its collectives, every regrouping rounds, and the
results differ by 1-3 ulps (measured: DualPipeV pp=2 dp=2, 3.83221173 vs 3.83221102, which moved the factor
by one ulp). So here the squares are summed in float64: the square of an fp32 element is exact in float64 and
a float64 sum is exact to ~1e-15 relative in any order or grouping, so the one rounding to fp32 -- when the
factor multiplies an fp32 gradient -- gives the same bits however the sum was split. ``squared_norm`` is the
piece every side sums (over whole tensors or over slices of them), ``clip_coefficient`` turns the total norm
into the factor, and ``clip_gradients`` is the single-process composition of the two.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def squared_norm(grads: Iterable[torch.Tensor], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of the squares of every element of ``grads`` (whole tensors or slices), as a float64 scalar.

    Sums of disjoint pieces add up to the sum of the whole, to float64 rounding. ``device``: where the zero of an
    empty list lives (a rank whose partition holds no counted gradient still joins the all-reduce)."""
    squares = [torch.linalg.vector_norm(g.detach(), dtype=torch.float64).square() for g in grads]
    if not squares:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(squares).sum()


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), in float64: it is rounded once,
    to the gradient's dtype, when it multiplies the gradient."""
    return torch.clamp(max_norm / (total_norm.to(torch.float64) + 1e-6), max=1.0)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of all gradients (returned, before clipping); gradients scaled by ``clip_coefficient``
    unless ``max_norm`` is 0."""
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = squared_norm(grads).sqrt()
    if max_norm > 0:
        coef = clip_coefficient(total_norm, max_norm)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return float(total_norm)
