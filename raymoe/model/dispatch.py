"""The token-dispatch seam of the MoE layer: which rows go where, and the local (single-device) dispatcher.

Legend: N tokens of this rank, K experts per token, D model dim, P expert-parallel ranks, S rows sent,
R rows received, E routed experts.

A MoE layer asks a ``TokenDispatcher`` to move its tokens to the ranks that hold their experts and to bring the
results back; the model never reads a rank. ``LocalDispatcher`` (this module) is the twin for one rank: every
expert is here, nothing moves. The all-to-all dispatcher (``raymoe.parallel.dispatcher``) is installed into the
model from outside and shares everything below except the exchange itself.

**One copy per destination rank.** A token whose top-k experts live on three ranks is sent three times, once to
each, however many of its experts a rank holds (DeepEP does the same; torchtitan and DeepSpeed send one copy per
(token, expert)). With each copy goes its routing row: the K expert ids with ``-1`` where the expert lives on
another rank, and the K gate weights with 0 there. The receiving rank runs its experts on the rows that chose
them, weights their outputs and sums them per row (``run_local_experts``); the source adds the per-rank partial
results in rank order, in fp32 (``DispatchPlan.combine``), so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from raymoe.model.grouped import compute_dtype, grouped_expert_mlp, resolve_backend, stack_expert_weights


@dataclass(frozen=True, kw_only=True)
class DispatchPlan:
    """What ``dispatch`` decided and ``combine`` needs: which token went to which rank, in which order."""

    num_tokens: int
    send_token_idx_S: torch.Tensor
    """Token index of every sent row, grouped by destination rank (ranks ascending, tokens ascending inside)."""
    send_counts: tuple[int, ...]
    """Rows sent to each rank (length P)."""
    recv_counts: tuple[int, ...]
    """Rows received from each rank (length P); equal to ``send_counts`` on one rank."""

    @property
    def num_sent(self) -> int:
        return int(sum(self.send_counts))

    def combine(self, partial_SD: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Sum the partial results that came back (rows in send order) into one row per token: rank by rank, in
        fp32, so the order of the sum never depends on timing."""
        y_ND = partial_SD.new_zeros((self.num_tokens, partial_SD.shape[1]), dtype=torch.float32)
        start = 0
        for count in self.send_counts:
            rows = slice(start, start + count)
            y_ND = y_ND.index_add(0, self.send_token_idx_S[rows], partial_SD[rows].float())
            start += count
        return y_ND.to(out_dtype)


def plan_rows(topk_ids_NK: torch.Tensor, rank_of_expert_E: torch.Tensor, num_ranks: int) -> tuple[
    torch.Tensor, torch.Tensor, list[int]
]:
    """Deduplicated send order: (send_token_idx_S, dest_rank_S, send_counts).

    ``rank_of_expert_E`` is the expert placement (expert id -> ep rank). A token goes to rank r once if any of its
    K experts lives on r; rows are grouped by destination rank, tokens ascending inside a group.
    """
    num_tokens = topk_ids_NK.shape[0]
    dest_NK = rank_of_expert_E[topk_ids_NK]
    needed_NP = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=topk_ids_NK.device)
    needed_NP.scatter_(1, dest_NK, True)
    # Transposed nonzero walks ranks first, then tokens ascending: the send order.
    dest_S, token_S = needed_NP.t().nonzero(as_tuple=True)
    send_counts = torch.bincount(dest_S, minlength=num_ranks).tolist()
    return token_S, dest_S, send_counts


def routing_rows(topk_ids_NK: torch.Tensor, weights_NK: torch.Tensor, rank_of_expert_E: torch.Tensor,
                 token_S: torch.Tensor, dest_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing row that travels with each sent copy: expert ids (``-1`` where the expert is not on the copy's
    destination) and gate weights (0 there; still differentiable, so the router learns through the exchange)."""
    ids_SK = topk_ids_NK[token_S]
    here_SK = rank_of_expert_E[ids_SK] == dest_S[:, None]
    weights_SK = weights_NK[token_S] * here_SK.to(weights_NK.dtype)
    return torch.where(here_SK, ids_SK, torch.full_like(ids_SK, -1)), weights_SK


def run_local_experts(experts: nn.ModuleDict, x_RD: torch.Tensor, ids_RK: torch.Tensor,
                      weights_RK: torch.Tensor, source_counts: Sequence[int] = (), *,
                      backend: str = "loop") -> torch.Tensor:
    """Run this rank's experts on the received rows and sum each row's weighted expert outputs: (R, D).

    ``experts`` maps *global* expert id (as a string) to the expert; ``ids_RK`` holds global ids, ``-1`` for
    slots another rank serves. Copies are sorted by expert id (stable: rows ascending inside an expert) and every
    local expert runs, even on zero rows, so every expert parameter gets a (zero) gradient and optimizers and
    ZeRO see the same set of gradients on every step.

    ``source_counts``: rows per source rank (received rows come grouped by source). Each source's rows run as
    their own expert batches, so an expert multiplies exactly the rows it would multiply on one device for that
    source's micro-batch: GEMM kernels pick their blocking by the row count, and the same rows give the same bits
    as the single-process reference (a CPU choice for exact parity; a GPU grouped GEMM would batch all sources).

    ``backend`` (``raymoe.model.grouped``): ``loop`` runs each expert module in turn (the FP8 and zero-bubble
    seams act inside them); ``auto`` runs plain BF16 experts on CUDA as grouped GEMMs over stacked weights
    (``torch._grouped_mm``), all sources in one batch, and loops elsewhere; ``grouped_mm`` forces the kernel.
    """
    expert_ids = sorted(int(e) for e in experts)
    modules = [experts[str(e)] for e in expert_ids]
    grouped = backend != "loop" and _groupable(modules) and resolve_backend(
        backend, x_RD, (modules[0].w1.out_features, modules[0].w1.in_features)) == "grouped_mm"
    if len(source_counts) > 1 and not grouped:
        pieces = zip(x_RD.split(list(source_counts)), ids_RK.split(list(source_counts)),
                     weights_RK.split(list(source_counts)))
        return torch.cat([run_local_experts(experts, x, ids, w) for x, ids, w in pieces])
    top_k = ids_RK.shape[1]
    flat_ids = ids_RK.flatten()
    order = flat_ids.argsort(stable=True)
    num_skipped = int((flat_ids < 0).sum())
    order = order[num_skipped:]  # -1 sorts first: slots served elsewhere
    counts = _counts_of(flat_ids[order], expert_ids)
    row_of_copy = order // top_k
    x_sorted = x_RD[row_of_copy]
    if grouped:
        stacked = stack_expert_weights(modules, dtype=compute_dtype(x_RD))
        counts_E = torch.tensor(counts, dtype=torch.int64, device=x_RD.device)
        y_cat = grouped_expert_mlp(x_sorted, counts_E, *stacked, backend="grouped_mm")
    else:
        y_cat = torch.cat([expert(chunk) for expert, chunk in zip(modules, x_sorted.split(counts))])
    y_sorted = y_cat * weights_RK.flatten()[order].unsqueeze(1).to(x_RD.dtype)
    return torch.zeros_like(x_RD).index_add_(0, row_of_copy, y_sorted)


def _groupable(modules: list[nn.Module]) -> bool:
    """Plain SwiGLU experts whose three weights can be stacked (not FP8 or zero-bubble deferred linears)."""
    return bool(modules) and all(type(getattr(m, name, None)) is nn.Linear for m in modules
                                 for name in ("w1", "w2", "w3"))


def _counts_of(sorted_ids: torch.Tensor, expert_ids: list[int]) -> list[int]:
    if not expert_ids:
        return []
    lo, hi = expert_ids[0], expert_ids[-1]
    if hi - lo + 1 == len(expert_ids):  # contiguous ids: one bincount
        counts = torch.bincount(sorted_ids - lo, minlength=len(expert_ids)).tolist()
    else:
        counts = [int((sorted_ids == e).sum()) for e in expert_ids]
    if sum(counts) != sorted_ids.numel() or len(counts) != len(expert_ids):
        held = set(expert_ids)
        stray = sorted({int(e) for e in sorted_ids.tolist()} - held)
        raise ValueError(f"rows routed to experts {stray[:8]} reached a rank holding experts "
                         f"{expert_ids[0]}..{expert_ids[-1]}: the expert placement differs between ranks")
    return counts


class TokenDispatcher(Protocol):
    """Moves a MoE layer's tokens to their experts and the results back (``raymoe.parallel`` installs one)."""

    def dispatch(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, weights_NK: torch.Tensor, *,
                 layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchPlan]:
        """(x_RD, ids_RK, weights_RK, plan): the rows this rank's experts must serve, and how to send back."""
        ...

    def combine(self, y_RD: torch.Tensor, plan: DispatchPlan, *, layer: int, out_dtype: torch.dtype) -> torch.Tensor:
        """The (N, D) output for this rank's tokens from the rows its experts' outputs computed."""
        ...


class LocalDispatcher:
    """The one-rank twin: every expert is local, every token is one row, nothing moves. With ``fp8`` the tokens
    are rounded as an FP8 dispatch would round them (``precision.fp8_dispatch``), so the twin computes what the
    all-to-all computes."""

    def __init__(self, *, fp8: bool = False, fp8_power_of_two: bool = False) -> None:
        self.fp8, self.fp8_power_of_two = fp8, fp8_power_of_two

    def dispatch(self, x_ND, topk_ids_NK, weights_NK, *, layer):
        n = x_ND.shape[0]
        if self.fp8:
            from raymoe.fp8.dispatch import fake_quantize_for_dispatch

            x_ND = fake_quantize_for_dispatch(x_ND, power_of_two_scales=self.fp8_power_of_two)
        plan = DispatchPlan(num_tokens=n, send_token_idx_S=torch.arange(n, device=x_ND.device), send_counts=(n,),
                            recv_counts=(n,))
        return x_ND, topk_ids_NK, weights_NK, plan

    def combine(self, y_RD, plan, *, layer, out_dtype):
        return y_RD.to(out_dtype)  # one row per token in token order: the sum is the row itself
