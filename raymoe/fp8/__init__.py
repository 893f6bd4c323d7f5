"""Fine-grained FP8 mixed precision, the DeepSeek-V3 recipe (arXiv 2412.19437, section 3.3).

How FP8 training works here, in the order the pieces are used:

1. ``quant``: E4M3 has 3 mantissa bits and a range of +-448, too narrow for one scale per tensor. Activations are
   scaled per 1x128 tile (one token, 128 channels of the reduction dim), weights per 128x128 block; each scale is
   the group's current amax / 448 (online, no history), optionally rounded up to a power of two.
2. ``gemm``: every GEMM is A @ B^T over FP8 operands with those scales and a float32 (or bf16) output. On CUDA it is
   ``torch._scaled_mm`` with block-wise scales; elsewhere it is emulated exactly (dequantize, multiply in float32),
   optionally with Hopper's ~14-bit accumulation and promotion every N_C elements to show why promotion matters.
3. ``linear``: ``Fp8Linear`` runs Fprop, Dgrad and Wgrad all in FP8; outputs and master weights stay high precision.
   ``fused``: on CUDA its quantizations run as ``torch.compile``d kernels (eager, and unchanged, on CPU).
4. ``convert``: ``convert_linears(model)`` swaps the attention projections and MLP linears for ``Fp8Linear`` and
   leaves the embedding, head, gate, norms, attention core and MTP projection alone.
5. ``optim``: ``Bf16MomentAdamW`` keeps AdamW's moments in BF16 next to float32 master weights.
6. ``dispatch``: the expert-parallel all-to-all can carry tokens as FP8 + 1x128 scales.

Only torch is imported.
"""

from raymoe.fp8.convert import FP8_LINEAR_NAMES, convert_linears, default_filter, fp8_linear_names
from raymoe.fp8.dispatch import dequantize_from_dispatch, dispatch_bytes_per_token, quantize_for_dispatch
from raymoe.fp8.gemm import NEVER_PROMOTE, fp8_matmul, limited_precision_matmul, resolve_backend
from raymoe.fp8.linear import Fp8Linear, Fp8LinearFunction, Fp8Recipe, fp8_linear
from raymoe.fp8.optim import Bf16MomentAdamW, optimizer_state_bytes
from raymoe.fp8.quant import (
    BLOCK,
    COLUMN_TILE,
    FP8_DTYPE,
    FP8_MAX,
    TILE,
    Fp8Tensor,
    dequantize,
    fake_quantize,
    quantize,
    quantize_blocks,
    quantize_tiles,
)

__all__ = [
    "BLOCK",
    "COLUMN_TILE",
    "FP8_DTYPE",
    "FP8_LINEAR_NAMES",
    "FP8_MAX",
    "NEVER_PROMOTE",
    "TILE",
    "Bf16MomentAdamW",
    "Fp8Linear",
    "Fp8LinearFunction",
    "Fp8Recipe",
    "Fp8Tensor",
    "convert_linears",
    "default_filter",
    "dequantize",
    "dequantize_from_dispatch",
    "dispatch_bytes_per_token",
    "fake_quantize",
    "fp8_linear",
    "fp8_linear_names",
    "fp8_matmul",
    "limited_precision_matmul",
    "optimizer_state_bytes",
    "quantize",
    "quantize_blocks",
    "quantize_for_dispatch",
    "quantize_tiles",
    "resolve_backend",
]
