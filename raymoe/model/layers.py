"""Building blocks: RMSNorm, rotary position embedding, and the SwiGLU MLP.

Legend: B batch, T sequence, D model dim, H heads, R rotary dim, I hidden (intermediate) dim.

Every projection is a plain ``nn.Linear(bias=False)``: that is the seam through which ``raymoe.fp8.convert_linears``
swaps in FP8 GEMMs without the model knowing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (the paper keeps norms in high precision), hand back the input's dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Rope(nn.Module):
    """Rotary tables for the decoupled RoPE part of MLA (pairs of adjacent channels rotate together)."""

    def __init__(self, rotary_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.max_seq_len = max_seq_len
        self.theta = theta

    def tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos_TR2, sin_TR2) in fp32, R2 = rotary_dim / 2. Recomputed per call: it is tiny next to attention."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len {self.max_seq_len}")
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.rotary_dim, 2, device=device).float() / self.rotary_dim))
        angles_TR2 = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
        return angles_TR2.cos(), angles_TR2.sin()


def apply_rope(x_BTHR: torch.Tensor, cos_TR2: torch.Tensor, sin_TR2: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x by position-dependent angles; computed in fp32."""
    x = x_BTHR.float().unflatten(-1, (-1, 2))
    even, odd = x[..., 0], x[..., 1]
    cos, sin = cos_TR2[:, None, :], sin_TR2[:, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x_BTHR.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for dense layers, shared and routed experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
