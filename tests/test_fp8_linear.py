"""Fp8Linear: all three GEMMs in FP8; gradients are the straight-through ones of the quantized operands."""

import pytest
import torch
from torch import nn

from raymoe.fp8.linear import Fp8Linear, Fp8Recipe, fp8_linear
from raymoe.fp8.quant import BLOCK, TILE, fake_quantize


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grads(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, module.weight.grad


def test_exact_on_fp8_representable_values():
    """Small integers with power-of-two scales survive every (re)quantization exactly, so all three FP8 GEMMs
    must reproduce the fp32 layer bit for bit: forward, input gradient and weight gradient."""
    t, k, n = 48, 200, 136  # none a multiple of 128: padded last tiles/blocks
    x = torch.randint(-8, 9, (t, k), generator=_gen(0)).float()
    dy = torch.randint(-8, 9, (t, n), generator=_gen(1)).float()
    ref = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.randint(-8, 9, (n, k), generator=_gen(2)).float())
    fp8 = Fp8Linear.from_linear(nn.Linear(k, n, bias=False), Fp8Recipe(power_of_two_scales=True))
    with torch.no_grad():
        fp8.weight.copy_(ref.weight)
    for got, want in zip(_grads(fp8, x, dy), _grads(ref, x, dy)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("pow2", [False, True])
def test_gradients_are_those_of_the_quantized_operands(pow2):
    """Fprop uses Q_tile(x) Q_block(W)^T; Dgrad Q_tile(dy) Q_block(W); Wgrad Q_tile(dy^T) Q_tile(Q_tile(x)^T)^T."""
    t, k, n = 70, 256, 160
    x = torch.randn(t, k, generator=_gen(3))
    w = torch.randn(n, k, generator=_gen(4)) * 0.05
    dy = torch.randn(t, n, generator=_gen(5))
    weight = nn.Parameter(w.clone())
    xr = x.clone().requires_grad_(True)
    y = fp8_linear(xr, weight, Fp8Recipe(power_of_two_scales=pow2))
    y.backward(dy)

    def fq(v, block):
        return fake_quantize(v.contiguous(), block, power_of_two=pow2)

    x_q = fq(x, TILE)
    w_q = fq(w, BLOCK)
    torch.testing.assert_close(y, x_q @ w_q.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad, fq(dy, TILE) @ w_q, rtol=1e-5, atol=1e-5)
    dw = fq(dy.t(), TILE) @ fq(x_q.t(), TILE).t()
    torch.testing.assert_close(weight.grad, dw, rtol=1e-5, atol=1e-4)


def test_close_to_high_precision_linear_within_fp8_tolerance():
    """Gaussian data: each GEMM lands ~3% (relative Frobenius) from fp32 -- E4M3's rounding, not a bug."""
    t, k, n = 256, 384, 128
    x = torch.randn(4, t // 4, k, generator=_gen(6))  # 3-D input: leading dims are tokens
    dy = torch.randn(4, t // 4, n, generator=_gen(7))
    ref = nn.Linear(k, n, bias=True)
    fp8 = Fp8Linear(k, n, bias=True)
    fp8.load_state_dict(ref.state_dict())
    (y0, dx0, dw0), (y1, dx1, dw1) = _grads(ref, x, dy), _grads(fp8, x, dy)
    assert y1.shape == y0.shape and dx1.shape == dx0.shape and dw1.shape == dw0.shape
    for got, want in ((y1, y0), (dx1, dx0), (dw1, dw0)):
        rel = ((got - want).norm() / want.norm()).item()
        assert 0.005 < rel < 0.06, rel  # measured: y 3.6%, dx 3.6%, dW 4.5% (x is requantized along T)
    torch.testing.assert_close(fp8.bias.grad, ref.bias.grad)
    cos = torch.nn.functional.cosine_similarity(dw1.flatten(), dw0.flatten(), dim=0)
    assert cos > 0.999


def test_frozen_weight_no_grad_and_bf16():
    lin = Fp8Linear(64, 32, bias=False)
    lin.weight.requires_grad_(False)
    x = torch.randn(10, 64, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is None
    with torch.no_grad():
        assert lin(x).shape == (10, 32)
    xb = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    lin.weight.requires_grad_(True)
    yb = lin(xb)
    yb.float().sum().backward()
    assert yb.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    assert lin.weight.grad.dtype == torch.float32  # master weight precision


def test_emulated_promotion_runs_in_the_layer():
    x = torch.randn(16, 256, generator=_gen(8), requires_grad=True)
    w = nn.Parameter(torch.randn(64, 256, generator=_gen(9)) * 0.05)
    exact = fp8_linear(x, w, Fp8Recipe(backend="emulate"))
    promoted = fp8_linear(x, w, Fp8Recipe(backend="emulate", promotion_interval=128))
    never = fp8_linear(x, w, Fp8Recipe(backend="emulate", promotion_interval=-1))
    e_promoted = (promoted - exact).norm() / exact.norm()
    e_never = (never - exact).norm() / exact.norm()
    assert 0 < e_promoted < e_never < 1e-3
    promoted.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_recipe_validation():
    with pytest.raises(ValueError, match="must be one of"):
        Fp8Recipe(backend="te")
    with pytest.raises(ValueError, match="only applies to the emulate backend"):
        Fp8Recipe(backend="scaled_mm", promotion_interval=128)
    with pytest.raises(ValueError, match="multiple of 32"):
        Fp8Recipe(promotion_interval=48)
    assert Fp8Recipe(promotion_interval=128).promotion_for(torch.device("cuda")) == 0
    assert Fp8Recipe(promotion_interval=128).promotion_for(torch.device("cpu")) == 128


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (an sm90 GPU for block scales)")


@pytest.mark.gpu
@needs_cuda
def test_scaled_mm_layer_matches_emulation_on_cuda():
    torch.manual_seed(0)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend in ("scaled_mm", "emulate"):
        torch.manual_seed(1)
        lin = Fp8Linear(1024, 768, bias=False, recipe=Fp8Recipe(backend=backend), device="cuda")
        results.append(_grads(lin, x, dy))
    for got, want in zip(*results):
        got, want = got.float(), want.float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_autocast_gives_bf16_activations_and_fp32_weight_grads():
    lin = Fp8Linear(128, 64, bias=False)
    x = torch.randn(8, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        y.float().sum().backward()  # backward inside the region, as the reference trainer does
    assert y.dtype == torch.bfloat16
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    ref = fp8_linear(x.detach().bfloat16(), lin.weight.detach())
    torch.testing.assert_close(y, ref)


def test_zero_tokens_an_idle_expert():
    lin = Fp8Linear(64, 32, bias=False)
    x = torch.zeros(0, 64, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 64)
    assert torch.equal(lin.weight.grad, torch.zeros(32, 64))
