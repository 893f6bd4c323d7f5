"""The FP8 seam of expert-parallel dispatch: send tokens as E4M3 + 1x128 scales, combine in high precision.

DeepSeek-V3 (section 3.3.2, "Low-precision communication") quantizes the activations *before* the MoE
up-projections to FP8 before the all-to-all dispatch, because the first thing an expert does with them is an FP8
GEMM that quantizes them in exactly these 1x128 tiles anyway; the combine (expert outputs back to their tokens)
stays BF16. A token's tiles depend only on that token, so the dispatcher can permute, split and send payload rows
and scale rows together, exactly as it would a dense ``x_TD``:

    payload_TD, scales_TG = quantize_for_dispatch(x_TD)           # sender: ~1.03 bytes / element
    ... all_to_all_single(payload rows), all_to_all_single(scale rows) with the same split sizes ...
    x_TD = dequantize_from_dispatch(payload_TD, scales_TG)        # receiver, before the expert MLP

Cost: D bytes of payload plus 4 * ceil(D / 128) bytes of scales per token, against 2 D (bf16) or 4 D (fp32).
With power-of-two scales, the receiving expert's own 1x128 quantization of the dequantized tokens reproduces the
same values exactly, so the dispatch adds no error beyond the one the FP8 GEMM would make anyway (with amax/448
scales the requantization may move a value by one more E4M3 rounding). A later optimisation can hand the payload
straight to the expert's GEMM and skip the requantization.

Legend: T = tokens, D = model dim, G = 128-wide scale groups per token (ceil(D / 128)).
"""

from __future__ import annotations

import torch

from raymoe.fp8.quant import FP8_DTYPE, TILE, Fp8Tensor, dequantize, quantize


def quantize_for_dispatch(
    x_TD: torch.Tensor, *, power_of_two_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(payload_TD float8_e4m3fn, scales_TG float32): one scale per token per 128 channels."""
    q = quantize(x_TD, TILE, power_of_two=power_of_two_scales)
    return q.data.contiguous(), q.scale


def dequantize_from_dispatch(
    payload_TD: torch.Tensor, scales_TG: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of ``quantize_for_dispatch`` (up to E4M3 rounding), in ``dtype``."""
    if payload_TD.dtype != FP8_DTYPE:
        raise ValueError(f"dispatch payload must be {FP8_DTYPE}, got {payload_TD.dtype}")
    if payload_TD.dim() != 2 or scales_TG.dim() != 2 or payload_TD.shape[0] != scales_TG.shape[0]:
        raise ValueError(
            f"payload {tuple(payload_TD.shape)} and scales {tuple(scales_TG.shape)} must be 2-D with one row per token"
        )
    return dequantize(Fp8Tensor(payload_TD, scales_TG, TILE), dtype)


def dispatch_bytes_per_token(dim: int) -> int:
    """Bytes one token occupies on the wire in FP8: payload plus its float32 tile scales."""
    return dim + 4 * -(-dim // TILE[1])


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, power_of_two: bool) -> torch.Tensor:
        payload, scales = quantize_for_dispatch(x_TD, power_of_two_scales=power_of_two)
        return dequantize_from_dispatch(payload, scales, dtype=x_TD.dtype)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        return grad_TD, None  # the gradient travels back in high precision, straight through the rounding


def fake_quantize_for_dispatch(x_TD: torch.Tensor, *, power_of_two_scales: bool = False) -> torch.Tensor:
    """What a token looks like after an FP8 dispatch, without moving it: the one-rank twin of the FP8
    all-to-all (the same per-token 1x128 tiles, so each row gets the same bits as through the exchange)."""
    return _FakeQuantize.apply(x_TD, power_of_two_scales)
