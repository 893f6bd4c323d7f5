"""The FP8 dispatch seam: tokens travel as E4M3 + per-token 1x128 scales."""

import pytest
import torch

from raymoe.fp8 import dequantize_from_dispatch, dispatch_bytes_per_token, quantize_for_dispatch
from raymoe.fp8.quant import E4M3_EPS, TILE, quantize


def _tokens(t=37, d=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g) * torch.logspace(-3, 3, t).unsqueeze(1)


def test_round_trip_within_e4m3_rounding():
    x_TD = _tokens()
    payload, scales = quantize_for_dispatch(x_TD)
    assert payload.dtype == torch.float8_e4m3fn and payload.shape == x_TD.shape and payload.is_contiguous()
    assert scales.shape == (37, 2) and scales.dtype == torch.float32
    back = dequantize_from_dispatch(payload, scales)
    big = x_TD.abs() >= scales.repeat_interleave(128, 1)[:, :200] * 2.0**-6  # normal range of E4M3
    assert ((back - x_TD).abs()[big] <= E4M3_EPS / 2 * x_TD.abs()[big] * (1 + 1e-6)).all()
    assert dequantize_from_dispatch(payload, scales, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_rows_are_independent_so_the_all_to_all_can_permute_them():
    x_TD = _tokens()
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(1))
    payload, scales = quantize_for_dispatch(x_TD)
    payload_p, scales_p = quantize_for_dispatch(x_TD[perm])
    assert torch.equal(payload[perm].view(torch.uint8), payload_p.view(torch.uint8))
    assert torch.equal(scales[perm], scales_p)


def test_experts_requantization_of_dispatched_tokens_is_lossless_with_pow2_scales():
    x_TD = _tokens()
    payload, scales = quantize_for_dispatch(x_TD, power_of_two_scales=True)
    received = dequantize_from_dispatch(payload, scales)
    expert_q = quantize(received, TILE, power_of_two=True)  # what the expert's first Fp8Linear does
    # Same values (a tile whose amax rounded down to 224 may come back as data x 2, scale / 2).
    assert torch.equal(expert_q.dequantize(), received)


def test_wire_size_and_validation():
    assert dispatch_bytes_per_token(7168) == 7168 + 4 * 56  # DeepSeek-V3's dim: 1.03 bytes per element
    payload, scales = quantize_for_dispatch(_tokens())
    with pytest.raises(ValueError, match="float8"):
        dequantize_from_dispatch(payload.float(), scales)
    with pytest.raises(ValueError, match="one row per token"):
        dequantize_from_dispatch(payload, scales[:-1])
