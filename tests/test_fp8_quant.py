"""E4M3 tile/block quantization: scale grids, round-trip error bounds, power-of-two scales, odd shapes."""

import pytest
import torch

from raymoe.fp8.quant import (
    BLOCK,
    COLUMN_TILE,
    E4M3_EPS,
    E4M3_MIN_NORMAL,
    FP8_DTYPE,
    FP8_MAX,
    TILE,
    dequantize,
    fake_quantize,
    quantize,
    quantize_blocks,
    quantize_tiles,
)


def _heavy_tailed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Per-row magnitudes spanning 8 orders of magnitude plus outliers: what a per-tensor scale cannot handle.
    rows = torch.logspace(-4, 4, shape[0]).unsqueeze(1)
    return torch.randn(*shape, generator=g).pow(3) * rows


def _assert_within_e4m3_bound(x, q):
    """|x - deq| <= 2^-4 |x| where x / scale is normal in E4M3, else <= 2^-10 * scale (half a subnormal step)."""
    br, bc = q.block
    scale_full = q.scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: x.shape[0], : x.shape[1]]
    err = (dequantize(q) - x).abs()
    normal = (x / scale_full).abs() >= E4M3_MIN_NORMAL
    assert (err[normal] <= (E4M3_EPS / 2) * x.abs()[normal] * (1 + 1e-6)).all()
    assert (err[~normal] <= 2.0**-10 * scale_full[~normal] * (1 + 1e-6)).all()


@pytest.mark.parametrize("shape", [(7, 128), (5, 300), (33, 64), (1, 1)])
def test_tile_round_trip_within_half_epsilon(shape):
    x = _heavy_tailed(*shape)
    q = quantize_tiles(x)
    assert q.data.dtype == FP8_DTYPE and q.data.shape == x.shape
    assert q.scale.shape == (shape[0], -(-shape[1] // 128)) and q.scale.dtype == torch.float32
    _assert_within_e4m3_bound(x, q)


@pytest.mark.parametrize("shape", [(256, 256), (200, 70), (384, 128), (130, 129)])
def test_block_round_trip_within_half_epsilon(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    q = quantize_blocks(x)
    assert q.scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    _assert_within_e4m3_bound(x, q)


def test_scale_is_online_amax_over_448_and_amax_survives():
    x = _heavy_tailed(6, 256)
    q = quantize_tiles(x)
    amax = x.abs().reshape(6, 2, 128).amax(-1)
    torch.testing.assert_close(q.scale, amax / FP8_MAX, rtol=0, atol=0)
    # The largest element of each tile maps onto 448 and comes back to float32 rounding.
    deq = dequantize(q).abs().reshape(6, 2, 128).amax(-1)
    torch.testing.assert_close(deq, amax, rtol=1e-6, atol=0)


def test_per_tile_scales_isolate_outliers():
    # One huge value in one tile must not flush the neighbouring tile (or row) to zero.
    x = torch.full((2, 256), 1e-3)
    x[0, 0] = 1e4
    deq = fake_quantize(x, TILE)
    assert deq[0, 1:128].eq(0).all()  # inside the outlier's tile 1e-3 falls below E4M3's subnormals...
    torch.testing.assert_close(deq[0, 128:], x[0, 128:], rtol=1e-6, atol=0)  # ...but only inside that tile
    torch.testing.assert_close(deq[1], x[1], rtol=1e-6, atol=0)


def test_power_of_two_scales_are_exact_powers_and_requantize_losslessly():
    x = _heavy_tailed(9, 200)
    q = quantize(x, TILE, power_of_two=True)
    mantissa, _ = torch.frexp(q.scale)
    assert mantissa.eq(0.5).all()
    # Round-up: amax / scale lies in (224, 448].
    amax = torch.nn.functional.pad(x.abs(), (0, 56)).reshape(9, 2, 128).amax(-1)
    ratio = amax / q.scale
    assert (ratio <= FP8_MAX).all() and (ratio > FP8_MAX / 2).all()
    _assert_within_e4m3_bound(x, q)
    again = quantize(dequantize(q), TILE, power_of_two=True)
    assert torch.equal(dequantize(again), dequantize(q))


def test_blocks_are_transpose_invariant():
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(2))
    q, qt = quantize_blocks(w), quantize_blocks(w.t().contiguous())
    assert torch.equal(q.t().scale, qt.scale)
    assert torch.equal(q.t().data.view(torch.uint8), qt.data.view(torch.uint8))
    torch.testing.assert_close(q.t().dequantize(), dequantize(q).t())


def test_zero_groups_and_bf16_input():
    x = torch.zeros(3, 200, dtype=torch.bfloat16)
    x[1, 150] = 2.5
    q = quantize_tiles(x)
    assert q.scale[0].eq(1).all() and q.scale[1, 0] == 1
    out = dequantize(q, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 3, 4), TILE)
    with pytest.raises(ValueError, match="float32/bfloat16"):
        quantize(torch.ones(2, 2, dtype=torch.int64), TILE)
    with pytest.raises(ValueError, match="block sizes"):
        quantize(torch.ones(2, 2), (0, 128))
    q = quantize(torch.ones(4, 4), BLOCK)
    with pytest.raises(ValueError, match="scale grid"):
        dequantize(type(q)(q.data, q.scale.repeat(2, 1), q.block))


def test_column_tiles_are_row_tiles_of_the_transpose():
    x = _heavy_tailed(300, 70)  # 300 tokens: a partial last 128x1 tile
    col = quantize(x, COLUMN_TILE).t()
    row = quantize(x.t().contiguous(), TILE)
    assert col.block == TILE and torch.equal(col.scale, row.scale)
    assert torch.equal(col.data.view(torch.uint8), row.data.view(torch.uint8))
    assert torch.equal(col.dequantize(), row.dequantize())
