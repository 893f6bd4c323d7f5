"""``Fp8Linear``: y = x W^T with all three GEMMs of the layer in FP8 (DeepSeek-V3 section 3.3, Figure 6).

    forward  (Fprop)  y  = x  W^T     x: 1x128 tiles along K (per token),   W: 128x128 blocks
    backward (Dgrad)  dx = dy W       dy: 1x128 tiles along N (per token), W: the same blocks, transposed
    backward (Wgrad)  dW = dy^T x     dy^T and x^T: 1x128 tiles along T (the tokens are this GEMM's reduction dim),
                                      i.e. 128x1 tiles of dy and x

Each GEMM is ``fp8_matmul(A, B)`` = A @ B^T with the reduction dim last (see ``gemm.py``). Only the *inputs* of a
GEMM are FP8; outputs come back in the input's dtype (float32 on CPU, bf16 on GPU) and the weight gradient in the
weight's dtype, so the master weights and the optimizer never see FP8.

What backward keeps: like the paper, the activation is cached in FP8 (its 1x128 tiles along K, ~1 byte per
element instead of 2-4). Wgrad needs it tiled along T instead, so backward dequantizes, transposes and requantizes
it -- exactly the "1x128 -> 128x1" conversion the paper describes -- which adds a second (small) rounding. The
weight's FP8 blocks are cached too and serve Dgrad transposed, since a 128x128 grid is its own transpose.

The quantizations go through ``fused.py``: eager on CPU (this emulation, bitwise as before), ``torch.compile``d
kernels on CUDA (``Fp8Recipe.fused_quantization``), with the Wgrad operands written already transposed.

Legend: T = tokens (all leading dims of x flattened), K = in_features, N = out_features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raymoe.fp8.fused import quantize_activation, quantize_columns_t, quantize_weight, requantize_columns_t
from raymoe.fp8.gemm import BACKENDS, HOPPER_ACCUM_MANTISSA_BITS, check_promotion_interval, fp8_matmul
from raymoe.fp8.quant import BLOCK, TILE, Fp8Tensor


@dataclass(frozen=True, kw_only=True)
class Fp8Recipe:
    """How an ``Fp8Linear`` quantizes and multiplies."""

    backend: str = "auto"
    """``auto`` (scaled_mm for CUDA inputs, emulate otherwise), ``emulate`` or ``scaled_mm``."""
    power_of_two_scales: bool = False
    promotion_interval: int = 0
    """Emulated tensor-core accumulation: 0 exact float32; N_C > 0 promote every N_C; -1 never promote."""
    mantissa_bits: int = HOPPER_ACCUM_MANTISSA_BITS
    fused_quantization: bool = True
    """CUDA only: run the 1x128 / 128x128 quantizations as ``torch.compile``d kernels (``fused.py``). CPU tensors
    are always quantized eagerly, so the emulation does not depend on it."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8 backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        check_promotion_interval(self.promotion_interval)
        if self.backend == "scaled_mm" and self.promotion_interval:
            raise ValueError(
                f"promotion_interval={self.promotion_interval} only applies to the emulate backend; "
                "cuBLAS promotes to fp32 by itself"
            )

    def promotion_for(self, device: torch.device) -> int:
        """The emulated promotion applies only where the GEMM is emulated (``auto`` on CUDA is the real kernel)."""
        return self.promotion_interval if device.type != "cuda" or self.backend == "emulate" else 0

    def matmul(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return fp8_matmul(
            a,
            b,
            out_dtype=out_dtype,
            backend=self.backend,
            promotion_interval=self.promotion_for(a.data.device),
            mantissa_bits=self.mantissa_bits,
        )


class Fp8LinearFunction(torch.autograd.Function):
    """Autograd for ``x @ weight.T`` with FP8 Fprop, Dgrad and Wgrad (no bias: the module adds it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
        pow2, fused = recipe.power_of_two_scales, recipe.fused_quantization
        x_TK = x.reshape(-1, x.shape[-1])
        x_q = quantize_activation(x_TK, power_of_two=pow2, fused=fused)
        w_q = quantize_weight(weight, power_of_two=pow2, fused=fused)
        y_TN = recipe.matmul(x_q, w_q, x.dtype)
        ctx.save_for_backward(x_q.data, x_q.scale, w_q.data, w_q.scale)
        ctx.recipe = recipe
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return y_TN.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        # backward() may run inside the caller's autocast region (CPU runs it on the calling thread).
        with torch.autocast(dy.device.type, enabled=False):
            return Fp8LinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy: torch.Tensor):
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        recipe: Fp8Recipe = ctx.recipe
        pow2, fused = recipe.power_of_two_scales, recipe.fused_quantization
        dy_TN = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q = quantize_activation(dy_TN, power_of_two=pow2, fused=fused)
            w_KN = Fp8Tensor(w_data, w_scale, BLOCK).t()
            dx = recipe.matmul(dy_q, w_KN, ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # Both operands tiled along T: 128x1 tiles of (T, .) are 1x128 tiles of the transpose.
            dy_NT = quantize_columns_t(dy_TN, power_of_two=pow2, fused=fused)
            x_KT = requantize_columns_t(Fp8Tensor(x_data, x_scale, TILE), power_of_two=pow2, fused=fused)
            dw = recipe.matmul(dy_NT, x_KT, ctx.w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe | None = None) -> torch.Tensor:
    """Functional form: ``x @ weight.T`` with every GEMM (forward and backward) in FP8.

    The output has x's dtype, or the autocast dtype when autocast is on (bf16 training: fp32 master weights,
    bf16 activations). Autocast itself is switched off inside, since it would round the emulation's float32
    dequantized operands to bf16 and must not touch the FP8 kernel's inputs.
    """
    recipe = recipe if recipe is not None else Fp8Recipe()
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return Fp8LinearFunction.apply(x, weight, recipe)


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs run in FP8. Parameters (and their names) are those of a plain Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        recipe: Fp8Recipe | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe if recipe is not None else Fp8Recipe()

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe | None = None) -> Fp8Linear:
        """Wrap ``linear``'s own Parameter objects (not copies), so optimizers and state_dicts are unaffected."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias  # a Parameter or None; either registers correctly
        module.recipe = recipe if recipe is not None else Fp8Recipe()
        module.train(linear.training)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.recipe)
        # The bias stays out of the FP8 GEMM (the paper keeps such small elementwise terms in high precision).
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        r = self.recipe
        return (
            f"{super().extra_repr()}, fp8=e4m3 1x128/128x128, backend={r.backend}, "
            f"pow2_scales={r.power_of_two_scales}, promotion_interval={r.promotion_interval}"
        )
