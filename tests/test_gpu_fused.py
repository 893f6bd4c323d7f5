"""The fused (torch.compile'd) FP8 quantizers, checked on CPU: the policy, the fallback, and (slow) that the
compiled twins trace with fullgraph + dynamic shapes and equal the eager math bitwise."""

import pytest
import torch

from raymoe.fp8 import Fp8Linear, Fp8Recipe, fused
from raymoe.fp8.quant import COLUMN_TILE, TILE, quantize


def test_cpu_tensors_never_take_the_compiled_path(monkeypatch):
    def boom(*args):
        raise AssertionError("compiled twin called for a CPU tensor")

    monkeypatch.setattr(fused.ACTIVATION_TILES, "_compiled", boom)
    x = torch.randn(5, 200)
    q = fused.quantize_activation(x, power_of_two=False, fused=True)
    ref = quantize(x, TILE)
    assert torch.equal(q.data.float(), ref.data.float()) and torch.equal(q.scale, ref.scale)


def test_eager_layouts_are_the_old_transposed_views():
    x = torch.randn(300, 70)
    q = fused.quantize_columns_t(x, power_of_two=True, fused=False)
    ref = quantize(x, COLUMN_TILE, power_of_two=True).t()
    assert q.block == TILE and q.shape == (70, 300) and not q.data.is_contiguous()
    assert torch.equal(q.data.float(), ref.data.float()) and torch.equal(q.scale, ref.scale)
    cached = quantize(x, TILE)
    r = fused.requantize_columns_t(cached, power_of_two=False, fused=False)
    want = quantize(cached.dequantize(), COLUMN_TILE).t()
    assert torch.equal(r.data.float(), want.data.float()) and torch.equal(r.scale, want.scale)
    with pytest.raises(ValueError, match="1x128-tiled"):
        fused.requantize_columns_t(want.t(), power_of_two=False, fused=False)


def test_a_failing_compile_warns_once_and_stays_eager(monkeypatch):
    quantizer = fused.FusedQuantizer("probe", fused._activation_tiles)
    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError("no triton here")

    quantizer._compiled = failing
    x = torch.randn(4, 128)

    class CudaLike:  # the policy only asks .is_cuda of the first argument
        is_cuda = True

    monkeypatch.setattr(quantizer, "eager", lambda *args: fused._activation_tiles(x, False))
    with pytest.warns(RuntimeWarning, match="torch.compile failed .RuntimeError: no triton here"):
        data, scale = quantizer(CudaLike(), False, fused=True)
    assert quantizer.failure == "RuntimeError: no triton here"
    assert torch.equal(data.float(), quantize(x, TILE).data.float())
    quantizer(CudaLike(), False, fused=True)  # no second attempt, no second warning
    assert len(calls) == 1


def test_fp8_linear_on_cpu_ignores_fused_quantization():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 256)
    outs = []
    for fused_quantization in (True, False):
        torch.manual_seed(1)
        lin = Fp8Linear(256, 192, bias=False, recipe=Fp8Recipe(fused_quantization=fused_quantization))
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, lin.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", fused.QUANTIZERS, ids=lambda q: q.name)
def test_compiled_twin_traces_and_matches_eager_bitwise_on_cpu(quantizer):
    """~20 s each on a 2-core CPU (Inductor's C++ backend); on CUDA the same graph goes to Triton."""
    torch.manual_seed(0)
    for shape in [(200, 384), (37, 256), (256, 130)]:  # ragged tiles and blocks, three shapes, one compile
        x = torch.randn(*shape) * 3
        args = (*fused._activation_tiles(x, False), True) if quantizer is fused.REQUANTIZE_COLUMN_TILES_T else (x, True)
        want, got = quantizer.eager(*args), quantizer.compiled(*args)
        for w, g in zip(want, got):
            assert w.shape == g.shape and torch.equal(w.float(), g.float())
        if quantizer in (fused.COLUMN_TILES_T, fused.REQUANTIZE_COLUMN_TILES_T):
            assert got[0].is_contiguous()  # the layout cuBLAS wants, written by the kernel


@pytest.mark.parametrize("tokens,k,n", [(16384, 2048, 1408), (4096, 1408, 2048), (1000, 10944, 2048)])
@pytest.mark.parametrize("compiled_layout", [False, True])
def test_fp8_linear_gemm_calls_pass_torchs_layout_rules_on_meta(tokens, k, n, compiled_layout):
    """Fprop, Dgrad and Wgrad as Fp8Linear makes them on CUDA, built from this module's quantizers on 'meta'
    tensors (the compiled twins write the Wgrad payload contiguous, the eager ones leave a transposed view):
    torch's meta kernel for _scaled_mm applies cuBLAS's block-scaling rules, so the calls are checked without a GPU."""
    from raymoe.fp8.gemm import _scaled_mm_blockwise

    x = torch.empty(tokens, k, device="meta", dtype=torch.bfloat16)
    dy = torch.empty(tokens, n, device="meta", dtype=torch.bfloat16)
    w_q = fused.quantize_weight(torch.empty(n, k, device="meta"), power_of_two=False, fused=False)
    x_q = fused.quantize_activation(x, power_of_two=False, fused=False)
    dy_q = fused.quantize_activation(dy, power_of_two=False, fused=False)
    columns = fused._column_tiles_t_contiguous if compiled_layout else fused._column_tiles_t
    requantize = fused._requantize_column_tiles_t_contiguous if compiled_layout else fused._requantize_column_tiles_t
    dy_NT = fused.Fp8Tensor(*columns(dy, False), TILE)
    x_KT = fused.Fp8Tensor(*requantize(x_q.data, x_q.scale, False), TILE)
    assert _scaled_mm_blockwise(x_q, w_q, torch.bfloat16).shape == (tokens, n)
    assert _scaled_mm_blockwise(dy_q, w_q.t(), torch.bfloat16).shape == (tokens, k)
    assert _scaled_mm_blockwise(dy_NT, x_KT, torch.float32).shape == (n, k)
    assert dy_NT.data.is_contiguous() == compiled_layout
