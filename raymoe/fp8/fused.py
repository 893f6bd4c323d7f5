"""The quantizations an ``Fp8Linear`` runs, fused into single kernels on CUDA with ``torch.compile``.

Eager quantization is several memory passes over the tensor (amax, divide, cast, and for the weight-gradient GEMM
a dequantize, a transpose and a copy); on an H100 a 4096x4096 activation took ~0.15 ms eager and ~0.05 ms compiled,
against ~0.1 ms for the 4096^3 FP8 GEMM it feeds, so eager quantization would eat most of FP8's gain. Each function
here is the eager math of ``quant.py`` written as plain tensors in, plain tensors out, so that ``torch.compile``
(Inductor, Triton on CUDA) traces it into one or two kernels:

    activation_tiles(x_TK)           1x128 tiles along K            Fprop's x, Dgrad's dy
    weight_blocks(w_NK)              128x128 blocks                 Fprop's W (Dgrad reuses it transposed)
    column_tiles_t(x_TN)             128x1 tiles of x, as (N, T)    Wgrad's dy^T (compiled: written contiguous)
    requantize_column_tiles_t(q)     dequantize 1x128, requantize   Wgrad's x^T from the cached FP8 activation
                                     128x1, transpose

Policy (``FusedQuantizer.__call__``): the compiled twin runs only for CUDA tensors when asked
(``Fp8Recipe.fused_quantization``); CPU tensors always take the eager function, so the CPU emulation is bitwise
what it was. If compiling fails (no Triton, no C++ compiler, an unsupported op), the quantizer warns once and stays
eager for the rest of the process: the result is the same math, only slower. The compiled twin is also callable
directly (``.compiled``), which is how the CPU tests check that it traces (``fullgraph=True``, dynamic shapes) and
matches the eager result.

Legend: T = tokens, K = reduction dim, N = output features; Tg = ceil(T / 128).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from raymoe.fp8.quant import BLOCK, COLUMN_TILE, TILE, Fp8Tensor, dequantize, quantize_payload


def _activation_tiles(x_TK: torch.Tensor, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_payload(x_TK, TILE, power_of_two=power_of_two)


def _weight_blocks(w_NK: torch.Tensor, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_payload(w_NK, BLOCK, power_of_two=power_of_two)


def _column_tiles_t(x_TN: torch.Tensor, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # 128x1 tiles of (T, N) are 1x128 tiles of (N, T): a transposed view, no copy (the CPU path's layout).
    data_TN, scale_TgN = quantize_payload(x_TN, COLUMN_TILE, power_of_two=power_of_two)
    return data_TN.t(), scale_TgN.t()


def _column_tiles_t_contiguous(x_TN: torch.Tensor, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # cuBLAS wants this operand row-major: writing it transposed inside the kernel saves a separate copy.
    data_NT, scale_NTg = _column_tiles_t(x_TN, power_of_two)
    return data_NT.contiguous(), scale_NTg


def _requantize_column_tiles_t(
    data_TK: torch.Tensor, scale_TKg: torch.Tensor, power_of_two: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _column_tiles_t(dequantize(Fp8Tensor(data_TK, scale_TKg, TILE)), power_of_two)


def _requantize_column_tiles_t_contiguous(
    data_TK: torch.Tensor, scale_TKg: torch.Tensor, power_of_two: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _column_tiles_t_contiguous(dequantize(Fp8Tensor(data_TK, scale_TKg, TILE)), power_of_two)


class FusedQuantizer:
    """One quantization with its eager function and a lazily built ``torch.compile`` twin (see the module doc)."""

    def __init__(
        self,
        name: str,
        eager: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        traced: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.name = name
        self.eager = eager
        self.traced = traced if traced is not None else eager
        """What gets compiled: the eager math, possibly writing its payload in the layout the GEMM wants."""
        self._compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self.failure: str | None = None
        """Why compiling failed, once it has; from then on every call is eager."""

    @property
    def compiled(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        if self._compiled is None:
            # dynamic=True: token counts change every step (routed experts, last batches) and must not recompile.
            self._compiled = torch.compile(self.traced, dynamic=True, fullgraph=True)
        return self._compiled

    def __call__(self, *args, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not fused or not args[0].is_cuda or self.failure is not None:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 -- any compiler failure has the same remedy: the eager math
            self.failure = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"fp8 quantizer {self.name!r}: torch.compile failed ({self.failure[:300]}); running it eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.eager(*args)


ACTIVATION_TILES = FusedQuantizer("activation_tiles", _activation_tiles)
WEIGHT_BLOCKS = FusedQuantizer("weight_blocks", _weight_blocks)
COLUMN_TILES_T = FusedQuantizer("column_tiles_t", _column_tiles_t, _column_tiles_t_contiguous)
REQUANTIZE_COLUMN_TILES_T = FusedQuantizer(
    "requantize_column_tiles_t", _requantize_column_tiles_t, _requantize_column_tiles_t_contiguous
)
QUANTIZERS = (ACTIVATION_TILES, WEIGHT_BLOCKS, COLUMN_TILES_T, REQUANTIZE_COLUMN_TILES_T)


def quantize_activation(x_TK: torch.Tensor, *, power_of_two: bool, fused: bool) -> Fp8Tensor:
    """1x128 tiles along the last dim."""
    return Fp8Tensor(*ACTIVATION_TILES(x_TK, power_of_two, fused=fused), TILE)


def quantize_weight(w_NK: torch.Tensor, *, power_of_two: bool, fused: bool) -> Fp8Tensor:
    """128x128 blocks."""
    return Fp8Tensor(*WEIGHT_BLOCKS(w_NK, power_of_two, fused=fused), BLOCK)


def quantize_columns_t(x_TN: torch.Tensor, *, power_of_two: bool, fused: bool) -> Fp8Tensor:
    """(N, T) in 1x128 tiles: the weight-gradient GEMM's operand, tiled along the tokens."""
    return Fp8Tensor(*COLUMN_TILES_T(x_TN, power_of_two, fused=fused), TILE)


def requantize_columns_t(q_TK: Fp8Tensor, *, power_of_two: bool, fused: bool) -> Fp8Tensor:
    """The cached 1x128-tiled activation, re-tiled along the tokens and transposed to (K, T)."""
    if q_TK.block != TILE:
        raise ValueError(f"requantize_columns_t takes 1x128-tiled activations, got {q_TK.block} groups")
    return Fp8Tensor(*REQUANTIZE_COLUMN_TILES_T(q_TK.data, q_TK.scale, power_of_two, fused=fused), TILE)
