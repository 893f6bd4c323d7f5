"""Routed experts as grouped GEMMs: every expert's SwiGLU MLP in three kernel launches instead of 3 E.

After dispatch, the token copies a rank holds are sorted by expert: ``x_sorted_TD`` has ``counts_E[0]`` rows for
expert 0, then ``counts_E[1]`` rows for expert 1, and so on (an expert may get none). The experts' weights are
stacked, ``w1_EID`` / ``w3_EID`` / ``w2_EDI``, and each expert computes ``w2(silu(w1 x) * w3 x)`` on its rows.

Two backends compute the same thing:

``loop`` (the CPU path, any dtype)
    One ``F.linear`` per expert and projection, exactly what ``raymoe.model.layers.MLP`` does, on the stacked
    weights' rows: bitwise equal to running the ``MLP`` modules one by one (tested). Needs the counts on the host.

``grouped_mm`` (the CUDA path, BF16)
    ``torch._grouped_mm(x_TD, w_EID.transpose(-2, -1), offs=cumsum(counts_E))``: one CUTLASS kernel per projection
    over all experts (on sm90 the BF16 kernel; elsewhere, and on CPU in float32, torch falls back to a loop of
    ``mm``). Backward is torch's own (a grouped GEMM for dX, a 2-D x 2-D grouped GEMM for dW). Like torchtitan we
    pad every expert's rows to a multiple of ``GROUP_ALIGN`` (8 BF16 rows = 16 bytes), which the kernel's TMA
    loads need in the weight-gradient GEMM, where the token dim is the reduction dim cut at the offsets; an expert
    with no tokens gets ``GROUP_ALIGN`` zero rows rather than an empty group. The padded layout is built on the
    device from ``counts_E`` without a host sync: the buffer has the static worst-case length T + E * GROUP_ALIGN
    and the last expert's group runs to its end, so no row lies past the final offset (such rows would be left
    uninitialised by the kernel). Zero rows add nothing to any product, and their outputs are never gathered.

``stack_expert_weights(experts)`` turns a ModuleList of ``MLP`` experts into the stacked tensors with
``torch.stack``, so gradients flow back to every expert's own parameters (a zero-row expert gets zeros), and
parameter names, state dicts and checkpoints are unchanged. The stack is a copy of the expert weights per forward;
storing the experts pre-stacked removes it (what the expert-parallel layout decides).

FP8: torch offers grouped FP8 GEMMs only with row-wise (``_scaled_grouped_mm``) or MX (sm100) scales, not
DeepSeek-V3's 1x128 / 128x128 blocks, so routed experts run BF16 grouped GEMMs and FP8 stays on the attention,
dense-FFN and shared-expert linears (``raymoe.fp8.convert_linears``).

Legend: T = token copies (sorted by expert), P = padded rows, E = experts, D = model dim, I = expert hidden dim.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "loop", "grouped_mm")
GROUP_ALIGN = 8
"""Rows per expert group are padded to a multiple of this (16 bytes of BF16) for ``grouped_mm``."""


class StackedExperts(NamedTuple):
    """The experts' SwiGLU weights stacked along a leading expert dim (a typed tuple: unpacks as three tensors)."""

    w1_EID: torch.Tensor
    w3_EID: torch.Tensor
    w2_EDI: torch.Tensor


def stack_expert_weights(
    experts: Iterable[nn.Module] | nn.ModuleDict, *, dtype: torch.dtype | None = None
) -> StackedExperts:
    """Stack the w1 / w3 / w2 weights of ``MLP`` experts; autograd flows back to each expert's parameters.

    ``dtype`` casts each weight before stacking (BF16 compute: half the bytes of stacking FP32 masters and casting
    the stack)."""
    modules = list(experts.values()) if isinstance(experts, nn.ModuleDict) else list(experts)
    if not modules:
        raise ValueError("stack_expert_weights needs at least one expert, got none")
    for index, module in enumerate(modules):
        if not all(isinstance(getattr(module, name, None), nn.Linear) for name in ("w1", "w2", "w3")):
            raise ValueError(f"expert {index} ({type(module).__name__}) is not an MLP with w1, w2, w3 linears")

    def stacked(name: str) -> torch.Tensor:
        weights = [getattr(m, name).weight for m in modules]
        return torch.stack([w.to(dtype) for w in weights] if dtype is not None else weights)

    return StackedExperts(stacked("w1"), stacked("w3"), stacked("w2"))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on for x's device, else x's own."""
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def resolve_backend(backend: str, x: torch.Tensor, dims: tuple[int, ...] = ()) -> str:
    """``auto``: ``grouped_mm`` for BF16 compute on CUDA (the fast kernel) when every dim in ``dims`` is a whole
    number of 16-byte rows (the kernel's stride rule), ``loop`` everywhere else."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped expert backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        aligned = all(d % GROUP_ALIGN == 0 for d in dims)
        return "grouped_mm" if x.is_cuda and compute_dtype(x) == torch.bfloat16 and aligned else "loop"
    return backend


def _check_shapes(x_sorted_TD, counts_E, w1_EID, w3_EID, w2_EDI) -> None:
    num_experts, inter_dim, dim = w1_EID.shape
    if x_sorted_TD.dim() != 2 or x_sorted_TD.shape[1] != dim:
        raise ValueError(
            f"x_sorted_TD must be (T, {dim}) to match w1_EID {tuple(w1_EID.shape)}, got {tuple(x_sorted_TD.shape)}"
        )
    if tuple(w3_EID.shape) != (num_experts, inter_dim, dim) or tuple(w2_EDI.shape) != (num_experts, dim, inter_dim):
        raise ValueError(
            f"expert weights disagree: w1_EID {tuple(w1_EID.shape)}, w3_EID {tuple(w3_EID.shape)}, "
            f"w2_EDI {tuple(w2_EDI.shape)} (want (E, I, D), (E, I, D), (E, D, I))"
        )
    if counts_E.dim() != 1 or counts_E.shape[0] != num_experts or counts_E.is_floating_point():
        raise ValueError(
            f"counts_E must be an integer tensor of shape ({num_experts},), "
            f"got {counts_E.dtype} {tuple(counts_E.shape)}"
        )


def grouped_expert_mlp(
    x_sorted_TD: torch.Tensor,
    counts_E: torch.Tensor,
    w1_EID: torch.Tensor,
    w3_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``y_sorted_TD``: expert e's SwiGLU MLP applied to its ``counts_E[e]`` consecutive rows of ``x_sorted_TD``."""
    _check_shapes(x_sorted_TD, counts_E, w1_EID, w3_EID, w2_EDI)
    if resolve_backend(backend, x_sorted_TD, tuple(w1_EID.shape[1:])) == "loop":
        return _loop(x_sorted_TD, counts_E, w1_EID, w3_EID, w2_EDI)
    return _grouped_mm(x_sorted_TD, counts_E, w1_EID, w3_EID, w2_EDI)


def _loop(x_sorted_TD, counts_E, w1_EID, w3_EID, w2_EDI) -> torch.Tensor:
    counts = counts_E.tolist()
    if sum(counts) != x_sorted_TD.shape[0] or min(counts) < 0:
        raise ValueError(
            f"counts_E must be >= 0 and sum to the {x_sorted_TD.shape[0]} rows of x_sorted_TD, got {counts}"
        )
    outputs = [
        # The expression of MLP.forward, term for term, so the result is bitwise the module's.
        F.linear(F.silu(F.linear(chunk, w1_EID[e])) * F.linear(chunk, w3_EID[e]), w2_EDI[e])
        for e, chunk in enumerate(x_sorted_TD.split(counts))
    ]
    return torch.cat(outputs)


class PaddedLayout(NamedTuple):
    """Where each sorted row goes in the padded buffer, and the int32 group ends ``_grouped_mm`` takes."""

    rows_T: torch.Tensor
    """int64 (T,): destination row of each input row."""
    offs_E: torch.Tensor
    """int32 (E,): cumulative padded group ends; the last one is the buffer length P."""
    num_rows: int
    """P = T + E * GROUP_ALIGN, a static bound on the padded length (no device-to-host sync)."""


def padded_layout(counts_E: torch.Tensor, num_tokens: int, align: int = GROUP_ALIGN) -> PaddedLayout:
    """Pad each expert's group to a multiple of ``align`` rows (at least ``align``), computed on counts' device."""
    counts_E = counts_E.long()
    num_experts = counts_E.shape[0]
    padded_E = torch.clamp_min((counts_E + align - 1) // align * align, align)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    padded_start_E = torch.cumsum(padded_E, 0) - padded_E
    expert_T = torch.repeat_interleave(
        torch.arange(num_experts, device=counts_E.device), counts_E, output_size=num_tokens
    )
    rows_T = torch.arange(num_tokens, device=counts_E.device) - start_E[expert_T] + padded_start_E[expert_T]
    num_rows = num_tokens + num_experts * align  # >= sum(padded_E): each group grows by at most `align` rows
    offs_E = torch.cumsum(padded_E, 0)
    offs_E[-1] = num_rows  # the last group absorbs the slack, so no row lies past the final offset
    return PaddedLayout(rows_T, offs_E.to(torch.int32), num_rows)


def _grouped_mm(x_sorted_TD, counts_E, w1_EID, w3_EID, w2_EDI) -> torch.Tensor:
    dtype = compute_dtype(x_sorted_TD)
    device = x_sorted_TD.device
    layout = padded_layout(counts_E.to(device), x_sorted_TD.shape[0])
    # Autocast does not know _grouped_mm: cast explicitly, and keep autocast away from the elementwise middle.
    no_autocast = (
        torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()
    )
    with no_autocast:
        x = x_sorted_TD.to(dtype)
        x_PD = x.new_zeros(layout.num_rows, x.shape[1]).index_copy(0, layout.rows_T, x)
        h1_PI = torch._grouped_mm(x_PD, w1_EID.to(dtype).transpose(-2, -1), offs=layout.offs_E)
        h3_PI = torch._grouped_mm(x_PD, w3_EID.to(dtype).transpose(-2, -1), offs=layout.offs_E)
        h_PI = F.silu(h1_PI) * h3_PI
        y_PD = torch._grouped_mm(h_PI, w2_EDI.to(dtype).transpose(-2, -1), offs=layout.offs_E)
        return y_PD.index_select(0, layout.rows_T)
