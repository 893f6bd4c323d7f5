"""FP8 GEMM with fine-grained scales: ``out = A @ B^T`` where both operands are E4M3 along the reduction dim K.

Every GEMM of an FP8 linear layer is written in this one form, A (M, K) times B (N, K) transposed, with the
reduction dimension last in both operands: A is always 1x128 tiles along K; B is 128x128 blocks (a weight) or
1x128 tiles along K (an activation, in the weight-gradient GEMM).

Two backends compute it:

``emulate`` (any device; the CPU path)
    Dequantize both operands to float32 (exact E4M3 values times their scales) and multiply in float32. torch's
    CPU ``_scaled_mm`` only takes tensor-wise or row-wise scales, so per-group scales have to be applied this way.
    ``promotion_interval`` additionally emulates how Hopper tensor cores accumulate FP8 products (DeepSeek-V3
    section 3.3.2): the running sum keeps only about 14 mantissa bits, and the paper's fix is to *promote* the
    partial sum into a float32 register on the CUDA cores every N_C = 128 elements of K. Here each step of
    ``MMA_K`` = 32 products (the K-depth of one FP8 WGMMA instruction) is summed in float32, added to an
    accumulator that is then truncated to ``mantissa_bits`` (round toward zero, as the tensor core's alignment
    shifts discard low bits), and that accumulator is flushed into an exact float32 sum every
    ``promotion_interval`` elements. ``NEVER_PROMOTE`` keeps the limited accumulator across all of K, which is what
    an FP8 GEMM without promotion does; at K = 4096 that error is orders of magnitude larger (see docs/fp8.md).

``scaled_mm`` (CUDA, Hopper)
    ``torch._scaled_mm`` with block-wise scales: ``scale_a`` (M, K/128) stored column-major, ``scale_b``
    (K/128, N/128) for 128x128 blocks or (K/128, N) for 1x128 tiles; cuBLAS promotes to float32 itself. Shapes that
    are not multiples of what the kernel needs are zero-padded (zeros add nothing to the product) and the result
    is cropped.

Legend: M, N = output rows, columns; K = reduction length; S = MMA steps along K (K / MMA_K);
Kg = number of 128-wide scale groups along K.
"""

from __future__ import annotations

import torch

from raymoe.fp8.quant import BLOCK, TILE, Fp8Tensor

BACKENDS = ("auto", "emulate", "scaled_mm")
MMA_K = 32
"""Products summed at full precision before they meet the limited-precision accumulator (one FP8 WGMMA)."""
HOPPER_ACCUM_MANTISSA_BITS = 14
"""'retaining around 14 bits' -- DeepSeek-V3, section 3.3.2."""
NEVER_PROMOTE = -1
"""``promotion_interval`` value: accumulate all of K with limited precision (no promotion at all)."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` becomes ``scaled_mm`` for CUDA tensors and ``emulate`` elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "scaled_mm" if device.type == "cuda" else "emulate"
    if backend == "scaled_mm" and device.type != "cuda":
        raise ValueError(f"fp8 backend 'scaled_mm' needs CUDA tensors (block-wise scales), got device {device}")
    return backend


def check_promotion_interval(promotion_interval: int) -> None:
    if promotion_interval == NEVER_PROMOTE or promotion_interval == 0:
        return
    if promotion_interval < 0 or promotion_interval % MMA_K:
        raise ValueError(
            f"promotion_interval must be 0 (exact fp32), {NEVER_PROMOTE} (never promote) or a positive multiple of "
            f"{MMA_K}, got {promotion_interval}"
        )


def fp8_matmul(
    a: Fp8Tensor,
    b: Fp8Tensor,
    *,
    out_dtype: torch.dtype,
    backend: str = "auto",
    promotion_interval: int = 0,
    mantissa_bits: int = HOPPER_ACCUM_MANTISSA_BITS,
) -> torch.Tensor:
    """``dequant(a) @ dequant(b).T``: a (M, K) in 1x128 tiles, b (N, K) in 128x128 blocks or 1x128 tiles."""
    if a.block != TILE or b.block not in (TILE, BLOCK):
        raise ValueError(
            f"operands must be A in {TILE} tiles and B in {TILE} or {BLOCK} groups, got {a.block}, {b.block}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"reduction dims differ: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    check_promotion_interval(promotion_interval)
    backend = resolve_backend(backend, a.data.device)
    if a.data.numel() == 0 or b.data.numel() == 0:  # an idle expert: no tokens, or no tokens to reduce over
        return torch.zeros(a.shape[0], b.shape[0], dtype=out_dtype, device=a.data.device)
    if backend == "scaled_mm":
        if promotion_interval:
            raise ValueError("promotion_interval only applies to the emulate backend (cuBLAS promotes by itself)")
        return _scaled_mm_blockwise(a, b, out_dtype)
    a_MK, b_NK = a.dequantize(), b.dequantize()
    if promotion_interval == 0:
        return (a_MK @ b_NK.t()).to(out_dtype)
    return limited_precision_matmul(a_MK, b_NK, promotion_interval, mantissa_bits=mantissa_bits).to(out_dtype)


def truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep ``bits`` of float32's 23 stored mantissa bits, rounding toward zero (exact bit masking)."""
    if not 0 <= bits <= 23:
        raise ValueError(f"mantissa bits must be in [0, 23], got {bits}")
    if bits == 23:
        return x
    mask = -(1 << (23 - bits))  # ...1110000 in two's complement: clears the low 23 - bits bits
    return (x.contiguous().view(torch.int32) & mask).view(torch.float32)


def limited_precision_matmul(
    a_MK: torch.Tensor,
    b_NK: torch.Tensor,
    promotion_interval: int,
    *,
    mantissa_bits: int = HOPPER_ACCUM_MANTISSA_BITS,
) -> torch.Tensor:
    """``a @ b.T`` accumulated like an FP8 tensor core: see the module docstring. Inputs are float32."""
    check_promotion_interval(promotion_interval)
    num_k = a_MK.shape[1]
    pad = -num_k % MMA_K
    if pad:  # zero products leave every partial sum unchanged
        a_MK = torch.nn.functional.pad(a_MK, (0, pad))
        b_NK = torch.nn.functional.pad(b_NK, (0, pad))
    num_steps = a_MK.shape[1] // MMA_K
    steps_per_promotion = num_steps if promotion_interval in (0, NEVER_PROMOTE) else promotion_interval // MMA_K
    # One full-precision partial product per MMA step: (S, M, N).
    a_SMk = a_MK.float().reshape(a_MK.shape[0], num_steps, MMA_K).transpose(0, 1)
    b_SkN = b_NK.float().reshape(b_NK.shape[0], num_steps, MMA_K).permute(1, 2, 0)
    step_SMN = torch.bmm(a_SMk, b_SkN)
    out_MN = torch.zeros_like(step_SMN[0])
    acc_MN = torch.zeros_like(out_MN)
    for s in range(num_steps):
        acc_MN = truncate_mantissa(acc_MN + step_SMN[s], mantissa_bits)
        if (s + 1) % steps_per_promotion == 0 or s == num_steps - 1:
            out_MN += acc_MN  # promotion: the CUDA-core float32 accumulator
            acc_MN = torch.zeros_like(out_MN)
    return out_MN


def _pad_to(x: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    pad_r, pad_c = rows - x.shape[0], cols - x.shape[1]
    if not (pad_r or pad_c):
        return x
    if x.dtype == torch.float8_e4m3fn:  # pad works on the raw bytes; 0x00 is +0.0 in E4M3
        return torch.nn.functional.pad(x.view(torch.uint8), (0, pad_c, 0, pad_r)).view(x.dtype)
    return torch.nn.functional.pad(x, (0, pad_c, 0, pad_r), value=value)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _scaled_mm_blockwise(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS block-scaled FP8 GEMM (sm90, CUDA >= 12.9). Layouts follow torch's own block-wise tests."""
    num_m, num_k = a.shape
    num_n = b.shape[0]
    # K: multiple of 512 so the count of 128-wide scale groups is a multiple of 4 (cuBLAS's padded scale
    # layout); N: whole 128-row blocks; M: 16-aligned. Zero payload contributes nothing; padded scales are 1.
    k_pad, n_pad, m_pad = _round_up(num_k, 512), _round_up(num_n, 128), _round_up(num_m, 16)
    kg_pad = k_pad // 128
    a_data = _pad_to(a.data.contiguous(), m_pad, k_pad)
    a_scale = _pad_to(a.scale.float(), m_pad, kg_pad, 1.0)
    a_scale = a_scale.t().contiguous().t()  # (M, Kg) column-major: 1x128 scales must be outer-dim-major
    b_data = _pad_to(b.data.contiguous(), n_pad, k_pad)  # row-major (N, K) -> .t() is the column-major mat2
    if b.block == BLOCK:
        b_scale = _pad_to(b.scale.float(), n_pad // 128, kg_pad, 1.0).contiguous().t()  # (Kg, N/128)
    else:
        b_scale = _pad_to(b.scale.float(), n_pad, kg_pad, 1.0).t().contiguous()  # (Kg, N)
    out_MN = torch._scaled_mm(
        a_data, b_data.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype, use_fast_accum=False
    )
    return out_MN[:num_m, :num_n]
