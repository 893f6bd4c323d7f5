"""Expert-parallel token dispatch: all-to-all inside one pipeline stage's ep group.

Legend: N tokens of this rank, K experts per token, D model dim, P ep ranks, S rows sent, R rows received,
C payload columns (D hidden + K gate weights + K expert ids).

``AllToAllDispatcher`` implements the ``TokenDispatcher`` seam of ``raymoe.model.dispatch`` and knows only its
process group and the expert placement; the worker installs it into every MoE layer of its stage. Per layer and
micro-batch, in this order on every rank of the group (the order is the action list's, so it is the same
everywhere):

1. **Counts.** One small ``all_to_all_single`` of ``(layer, columns, rows)`` per peer. Each rank learns how many
   rows it will receive, and checks that every peer is at the same layer with the same row width: two ranks
   that disagree get a ``ValueError`` naming the layer and the ranks, where torch would hang on mismatched
   split sizes (pytorch #117486).
2. **Dispatch.** One ``all_to_all_single`` with uneven splits moves each token once per destination rank
   (``raymoe.model.dispatch.plan_rows``), its routing row beside it. Optional FP8: the hidden part travels as
   E4M3 + 1x128 scales (``raymoe.fp8.dispatch``); gradients always travel in fp32.
3. **Combine.** The experts' weighted, per-row summed outputs go back by the same exchange with the splits
   swapped; the source adds the per-rank partials in rank order in fp32.

Both exchanges are autograd functions whose backward is the same exchange with the splits swapped (Megatron's
``_AllToAll``). gloo cannot do the list form of ``all_to_all`` with uneven sizes: ``all_to_all_single`` is used
throughout, and a rank with nothing to send still takes part with an empty tensor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from raymoe.model.dispatch import DispatchPlan, plan_rows, routing_rows
from raymoe.parallel.interleave import BACKWARD, FORWARD, ExchangeTiming, Interleaver


@dataclass
class DispatchStats:
    """What the all-to-alls of one step moved on this rank (sent bytes, forward and backward), and how long they
    took. ``naive``: one copy per (token, expert) pair; ``dedup``: one copy per (token, destination rank), the
    hidden state only; ``measured``: the bytes of every tensor this rank handed to ``all_to_all_single`` for
    another rank, routing rows and gradients included."""

    naive_bytes: int = 0
    dedup_bytes: int = 0
    measured_same_node_bytes: int = 0
    measured_cross_node_bytes: int = 0
    seconds: float = 0.0
    """From issue to result, summed over the exchanges (in an overlapped pair this spans the other chunk's
    compute)."""
    exposed_seconds: float = 0.0
    """The part of ``seconds`` the issuing chunk waited for: all of it when exchanges block, what the other
    chunk's compute did not cover when they overlap."""
    rows_received: int = 0
    peak_rows_received: int = 0
    calls: int = 0

    def reset(self) -> DispatchStats:
        done = DispatchStats(**vars(self))
        for name, value in vars(DispatchStats()).items():
            setattr(self, name, value)
        return done

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass(kw_only=True)
class _Exchange:
    """The all-to-all of one ep group: who is who, where the bytes go, and the counters. Forward exchanges run on
    ``group``, the backward ones (autograd's) on ``backward_group``: with overlap a forward and a backward chunk
    exchange in turns from two threads, and each group still sees its collectives in one fixed order.

    With an ``interleaver`` running an F&B pair (``raymoe.parallel.interleave``), an exchange is issued
    asynchronously and the other chunk computes while it is in flight; otherwise it blocks, as it always did."""

    group: object
    backward_group: object
    my_index: int
    node_of: tuple[int, ...]
    stats: DispatchStats = field(compare=False)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)
    interleaver: Interleaver | None = None
    log: list[ExchangeTiming] = field(default_factory=list, compare=False)
    """Every exchange of the step, in issue order (``ExchangeTiming``, ``time.perf_counter`` seconds)."""

    def run(self, x_SC: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int], *,
            backward: bool = False) -> torch.Tensor:
        out = x_SC.new_empty((int(sum(out_splits)), *x_SC.shape[1:]))
        args = (out, x_SC.contiguous(), list(map(int, out_splits)), list(map(int, in_splits)))
        group = self.backward_group if backward else self.group
        part = BACKWARD if backward else FORWARD
        start = time.perf_counter()
        if self.interleaver is not None and self.interleaver.active:
            work = dist.all_to_all_single(*args, group=group, async_op=True)
            wait_s, done_s = self.interleaver.in_flight(part, work.wait)
        else:
            dist.all_to_all_single(*args, group=group)
            wait_s, done_s = start, time.perf_counter()
        row_bytes = x_SC.element_size() * int(torch.tensor(x_SC.shape[1:]).prod()) if x_SC.dim() > 1 else 1
        same = sum(int(r) for p, r in enumerate(in_splits) if p != self.my_index
                   and self.node_of[p] == self.node_of[self.my_index])
        cross = sum(int(r) for p, r in enumerate(in_splits) if self.node_of[p] != self.node_of[self.my_index])
        with self.lock:
            self.stats.seconds += done_s - start
            self.stats.exposed_seconds += done_s - wait_s
            self.stats.calls += 1
            self.stats.measured_same_node_bytes += same * row_bytes
            self.stats.measured_cross_node_bytes += cross * row_bytes
            self.log.append(ExchangeTiming(part=part, issued_s=start, wait_s=wait_s, done_s=done_s))
        return out


class _AllToAll(torch.autograd.Function):
    """Rows to peers by ``in_splits``, rows from peers by ``out_splits``; backward swaps them."""

    @staticmethod
    def forward(ctx, x_SC, exchange: _Exchange, in_splits, out_splits):
        ctx.exchange, ctx.in_splits, ctx.out_splits = exchange, in_splits, out_splits
        return exchange.run(x_SC, in_splits, out_splits)

    @staticmethod
    def backward(ctx, grad_RC):
        return ctx.exchange.run(grad_RC, ctx.out_splits, ctx.in_splits, backward=True), None, None, None


class _Fp8AllToAll(torch.autograd.Function):
    """The dispatch of hidden states in FP8 (E4M3 payload + fp32 1x128 scales, the paper's low-precision
    dispatch); the gradient goes back in fp32 (straight through the quantization, as the local twin does)."""

    @staticmethod
    def forward(ctx, x_SD, exchange: _Exchange, in_splits, out_splits, power_of_two: bool):
        from raymoe.fp8.dispatch import dequantize_from_dispatch, quantize_for_dispatch

        ctx.exchange, ctx.in_splits, ctx.out_splits = exchange, in_splits, out_splits
        payload, scales = quantize_for_dispatch(x_SD, power_of_two_scales=power_of_two)
        # gloo has no float8 all-to-all: the payload travels as its bytes
        received = exchange.run(payload.view(torch.uint8), in_splits, out_splits).view(payload.dtype)
        received_scales = exchange.run(scales, in_splits, out_splits)
        return dequantize_from_dispatch(received, received_scales, dtype=x_SD.dtype)

    @staticmethod
    def backward(ctx, grad_RD):
        return ctx.exchange.run(grad_RD, ctx.out_splits, ctx.in_splits, backward=True), None, None, None, None


class AllToAllDispatcher:
    """The ``TokenDispatcher`` of one pipeline stage's ep group."""

    def __init__(self, *, group, rank_of_expert_E: torch.Tensor, node_of_rank: Sequence[int] | None = None,
                 fp8: bool = False, fp8_power_of_two: bool = False, backward_group=None) -> None:
        """``backward_group``: the communicator for backward exchanges (default: ``group``; with overlap, the ep
        group's twin, ``ProcessGroups.ep_backward``)."""
        self.group = group
        self.size = dist.get_world_size(group)
        self.my_index = dist.get_rank(group)
        self.rank_of_expert_E = rank_of_expert_E.long()
        node_of = tuple(node_of_rank) if node_of_rank is not None else (0,) * self.size
        if len(node_of) != self.size:
            raise ValueError(f"node_of_rank has {len(node_of)} entries for an ep group of {self.size}")
        self.fp8, self.fp8_power_of_two = fp8, fp8_power_of_two
        self.stats = DispatchStats()
        self._exchange = _Exchange(group=group, backward_group=backward_group if backward_group is not None else group,
                                   my_index=self.my_index, node_of=node_of, stats=self.stats)

    @property
    def interleaver(self) -> Interleaver | None:
        return self._exchange.interleaver

    @interleaver.setter
    def interleaver(self, value: Interleaver | None) -> None:
        """The executor's turn-taker for overlapped F&B pairs (None: exchanges always block)."""
        self._exchange.interleaver = value

    def take_exchange_log(self) -> list[ExchangeTiming]:
        """The exchanges since the last call, in issue order (the worker collects them once per step)."""
        with self._exchange.lock:
            log, self._exchange.log = self._exchange.log, []
        return log

    def _peer_rank(self, index: int) -> int:
        return dist.get_global_rank(self.group, index)

    def _exchange_counts(self, send_counts: list[int], *, layer: int, columns: int) -> list[int]:
        header = torch.tensor([[layer, columns, n] for n in send_counts], dtype=torch.int64)
        received = torch.empty_like(header)
        dist.all_to_all_single(received, header, group=self.group)
        for peer, (peer_layer, peer_columns, _) in enumerate(received.tolist()):
            if (peer_layer, peer_columns) != (layer, columns):
                raise ValueError(
                    f"all-to-all mismatch at MoE layer (router slot) {layer}: rank {self._peer_rank(self.my_index)} "
                    f"sends rows of {columns} columns, its ep peer rank {self._peer_rank(peer)} is at router slot "
                    f"{peer_layer} with {peer_columns} columns; ep ranks must run the same layers in the same order"
                )
        return received[:, 2].tolist()

    def dispatch(self, x_ND, topk_ids_NK, weights_NK, *, layer):
        rank_of = self.rank_of_expert_E.to(topk_ids_NK.device)
        token_S, dest_S, send_counts = plan_rows(topk_ids_NK, rank_of, self.size)
        ids_SK, weights_SK = routing_rows(topk_ids_NK, weights_NK, rank_of, token_S, dest_S)
        dim, top_k = x_ND.shape[1], topk_ids_NK.shape[1]
        recv_counts = self._exchange_counts(send_counts, layer=layer, columns=dim + 2 * top_k)
        x_SD = x_ND[token_S]
        # Gate weights ride in fp32 beside the hidden state (they carry the router's gradient), expert ids as exact
        # floats (< 2^24): one exchange for all of it, unless the hidden part goes in FP8.
        routing_SK2 = torch.cat([weights_SK.float(), ids_SK.float()], dim=1)
        if self.fp8:
            routing_RK2 = _AllToAll.apply(routing_SK2, self._exchange, send_counts, recv_counts)
            x_RD = _Fp8AllToAll.apply(x_SD, self._exchange, send_counts, recv_counts, self.fp8_power_of_two)
        else:
            payload_RC = _AllToAll.apply(torch.cat([x_SD.float(), routing_SK2], dim=1), self._exchange,
                                         send_counts, recv_counts)
            x_RD, routing_RK2 = payload_RC[:, :dim].to(x_ND.dtype), payload_RC[:, dim:]
        weights_RK, ids_RK = routing_RK2[:, :top_k], routing_RK2[:, top_k:].long()
        remote = [n for peer, n in enumerate(send_counts) if peer != self.my_index]
        naive_remote = int((rank_of[topk_ids_NK] != self.my_index).sum())
        row_bytes = dim * x_ND.element_size()
        # forward dispatch + combine, and their backward: four crossings of the hidden state
        with self._exchange.lock:
            self.stats.naive_bytes += 4 * naive_remote * row_bytes
            self.stats.dedup_bytes += 4 * sum(remote) * row_bytes
        received = int(sum(recv_counts))
        with self._exchange.lock:
            self.stats.rows_received += received
            self.stats.peak_rows_received = max(self.stats.peak_rows_received, received)
        plan = DispatchPlan(num_tokens=x_ND.shape[0], send_token_idx_S=token_S, send_counts=tuple(send_counts),
                            recv_counts=tuple(recv_counts))
        return x_RD, ids_RK, weights_RK, plan

    def combine(self, y_RD, plan, *, layer, out_dtype):
        partial_SD = _AllToAll.apply(y_RD.float(), self._exchange, plan.recv_counts, plan.send_counts)
        return plan.combine(partial_SD, out_dtype)


def contiguous_placement(num_experts: int, ep: int) -> torch.Tensor:
    """Expert id -> ep rank, ``num_experts / ep`` consecutive experts per rank (the default placement)."""
    if num_experts % ep:
        raise ValueError(f"{num_experts} routed experts cannot be split evenly over ep={ep} ranks")
    return torch.arange(num_experts) // (num_experts // ep)


def experts_of(rank_of_expert_E: torch.Tensor, ep_rank: int) -> list[int]:
    """Global ids of the experts ``ep_rank`` holds under a placement."""
    return [int(e) for e in (rank_of_expert_E == ep_rank).nonzero().flatten()]


def install_dispatcher(module: torch.nn.Module, dispatcher) -> int:
    """Make every MoE layer under ``module`` use ``dispatcher``; returns how many."""
    from raymoe.model.moe import MoE

    layers = [m for m in module.modules() if isinstance(m, MoE)]
    for moe in layers:
        moe.dispatcher = dispatcher
    return len(layers)
