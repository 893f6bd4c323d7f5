"""Fine-grained E4M3 quantization: 1x128 tiles for activations, 128x128 blocks for weights.

E4M3 (``torch.float8_e4m3fn``) keeps 3 mantissa bits and a largest finite value of 448. One scale for a whole
tensor lets a single outlier crush every other value into the format's subnormals, so DeepSeek-V3 (section
3.3.1) scales small groups instead: each 1x128 *tile* of an activation (one token, 128 consecutive channels
along the GEMM's reduction dimension) and each 128x128 *block* of a weight gets its own scale

    scale = amax(group) / 448          (computed online from the current values, no amax history)
    q     = round_to_e4m3(x / scale)   (so the group's largest magnitude lands on 448)
    x    ~= q * scale

Round-to-nearest gives a relative error of at most 2^-4 (half of E4M3's epsilon 2^-3) for values that land in
the normal range (|x / scale| >= 2^-6); smaller ones fall into E4M3's subnormals and carry an absolute error of at
most 2^-10 * scale. With ``power_of_two=True`` the scale is rounded up to a power of two, so multiplying by it is
exact (and a dequantize-requantize round trip is lossless), at the cost of up to one bit of range.

Shapes that are not multiples of the group size are handled by treating the last tile/block as zero-padded:
the scale grid is ``ceil``-sized and the FP8 payload keeps the logical shape.

Legend: R, C = rows, columns of the tensor being quantized; br, bc = group (tile/block) shape;
Rg, Cg = number of groups along R and C (ceil(R / br), ceil(C / bc)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite E4M3 magnitude."""
E4M3_EPS = 2.0**-3
"""Spacing of E4M3 values just above 1 (3 mantissa bits); round-to-nearest errs by at most half of it."""
E4M3_MIN_NORMAL = 2.0**-6
TILE = (1, 128)
"""Activation (and activation-gradient) groups: one row, 128 columns along the reduction dimension."""
COLUMN_TILE = (128, 1)
"""128x1 tiles: 128 tokens of one channel. Backward needs activations tiled along the token dimension (the
reduction dim of the weight-gradient GEMM); quantizing (T, D) in 128x1 tiles and transposing gives (D, T) in 1x128
tiles without copying the tensor."""
BLOCK = (128, 128)
"""Weight groups."""


@dataclass(frozen=True)
class Fp8Tensor:
    """An E4M3 payload with one float32 scale per (br x bc) group; ``data * scale`` approximates the original."""

    data: torch.Tensor
    """float8_e4m3fn, (R, C): the logical (unpadded) shape."""
    scale: torch.Tensor
    """float32, (Rg, Cg)."""
    block: tuple[int, int]
    """(br, bc): (1, 128) for tiles, (128, 128) for blocks."""

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def t(self) -> Fp8Tensor:
        """The transpose: payload, scale grid and group shape all transposed (a 128x128 block stays one block)."""
        return Fp8Tensor(self.data.t(), self.scale.t(), (self.block[1], self.block[0]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _check_2d_float(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what} must be a 2-D tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"{what} must be a float32/bfloat16/float16 tensor, got {x.dtype}")


def _grouped(x_RC: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """View as (Rg, br', Cg, bc'), zero-padding only where a dimension is longer than, but not a multiple of, the
    block. A dimension no longer than its block forms a single group of its own length: the same amax, scale and
    values as a zero-padded group, without the copy (the toy presets are full of 64-wide projections)."""
    rows, cols = x_RC.shape
    br, bc = max(1, min(block[0], rows)), max(1, min(block[1], cols))  # max(1, .): empty tensors (idle experts)
    pad_r, pad_c = -rows % br, -cols % bc
    if pad_r or pad_c:
        x_RC = torch.nn.functional.pad(x_RC, (0, pad_c, 0, pad_r))
    return x_RC.reshape((rows + pad_r) // br, br, (cols + pad_c) // bc, bc)


def scales_from_amax(amax: torch.Tensor, *, power_of_two: bool = False) -> torch.Tensor:
    """float32 scales mapping each group's amax onto 448; all-zero groups get scale 1 (any value would do)."""
    amax = amax.float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # amax / 448 underflows to 0 only for amax below ~6e-43; keep the division below finite.
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    if power_of_two:
        # Round *up* so that amax / scale <= 448 still holds.
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _group_amax(x_GbGb: torch.Tensor) -> torch.Tensor:
    """(Rg, 1, Cg, 1) absolute maxima; a single fused min/max pass for 1x128 and 128x1 tiles (the hot cases)."""
    for dim in (3, 1):
        if x_GbGb.shape[4 - dim] == 1:  # groups extend along ``dim`` only
            low, high = torch.aminmax(x_GbGb, dim=dim, keepdim=True)
            return torch.maximum(high, -low)
    return x_GbGb.abs().amax(dim=(1, 3), keepdim=True)


def quantize(x_RC: torch.Tensor, block: tuple[int, int], *, power_of_two: bool = False) -> Fp8Tensor:
    """Quantize a 2-D tensor to E4M3 with one scale per ``block`` group (online amax, no history)."""
    return Fp8Tensor(*quantize_payload(x_RC, block, power_of_two=power_of_two), block)


def quantize_payload(
    x_RC: torch.Tensor, block: tuple[int, int], *, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` as plain tensors (payload, scales): the form ``torch.compile`` traces (see ``fused.py``)."""
    _check_2d_float(x_RC, "the tensor to quantize")
    if block[0] < 1 or block[1] < 1:
        raise ValueError(f"block sizes must be >= 1, got {block}")
    rows, cols = x_RC.shape
    x_GbGb = _grouped(x_RC.float(), block)
    scale = scales_from_amax(_group_amax(x_GbGb), power_of_two=power_of_two)
    # No clamp needed: |x| / (amax / 448) exceeds 448 by at most float32 rounding, and that rounds to 448 in
    # E4M3 (which has no infinity: a real overflow would give NaN).
    q_GbGb = (x_GbGb / scale).to(FP8_DTYPE)
    g_r, b_r, g_c, b_c = q_GbGb.shape
    data = q_GbGb.reshape(g_r * b_r, g_c * b_c)[:rows, :cols]
    return data, scale[:, 0, :, 0].contiguous()


def dequantize(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data * scale`` group by group, in float32, then cast to ``dtype``."""
    if not q.data.is_contiguous() and q.data.t().is_contiguous():
        return dequantize(q.t(), dtype).t()  # a transposed view: work on the contiguous original
    rows, cols = q.data.shape
    q_GbGb = _grouped(q.data.float(), q.block)
    expected = (q_GbGb.shape[0], q_GbGb.shape[2])
    if tuple(q.scale.shape) != expected:
        raise ValueError(f"scale grid {tuple(q.scale.shape)} does not match payload {(rows, cols)} in {q.block} groups")
    x_GbGb = q_GbGb.mul_(q.scale[:, None, :, None].float())
    g_r, b_r, g_c, b_c = x_GbGb.shape
    return x_GbGb.reshape(g_r * b_r, g_c * b_c)[:rows, :cols].to(dtype)


def quantize_tiles(x_TK: torch.Tensor, *, power_of_two: bool = False) -> Fp8Tensor:
    """1x128 tiles along the last (reduction) dimension: one scale per token per 128 channels."""
    return quantize(x_TK, TILE, power_of_two=power_of_two)


def quantize_blocks(w_NK: torch.Tensor, *, power_of_two: bool = False) -> Fp8Tensor:
    """128x128 blocks: the grouping is symmetric, so ``quantize_blocks(w).t()`` serves ``w.t()`` as well."""
    return quantize(w_NK, BLOCK, power_of_two=power_of_two)


def fake_quantize(x_RC: torch.Tensor, block: tuple[int, int], *, power_of_two: bool = False) -> torch.Tensor:
    """``dequantize(quantize(x))`` in x's dtype: the value an FP8 GEMM actually sees."""
    return dequantize(quantize(x_RC, block, power_of_two=power_of_two), x_RC.dtype)
