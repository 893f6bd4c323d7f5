"""DualPipe's mirror-gradient sum, overlapped with the backward work that is still running.

DualPipe keeps two copies of the model: pipeline rank p holds chunk p of copy 0 and chunk pp-1-p of copy 1, its
mirror rank pp-1-p the same two chunks the other way round, and after the step's backward passes the two copies'
gradients are summed (the "mirror group") so that both take the same update. Summed after the last backward, the
whole model's gradients cross the wire while nothing else runs: on the development machine that all-reduce was
about as long as the optimizer itself.

But a chunk's gradients are final long before the step ends: after the last backward pass (B, I, W, an FB's
backward) that touches a stage of that chunk on this rank, and the action list says which pass that is. So
``MirrorGradSync`` counts the executor's backward passes (``after_backward``, called after every one of them, in
action-list order), and when a *unit* of parameters is final it flattens its gradients into buckets and starts an
asynchronous all-reduce of each; ``finish`` (before the optimizer) waits for them and copies the sums back.

Units: the parameters used by exactly the same set of chunks -- each chunk's own layers, and the parameters two
chunks share (the embedding, read by chunk 0 and by the last chunk's MTP modules) -- final after the later of
their chunks. A rank and its mirror hold the same chunks, hence the same units and buckets (names in sorted order).

Collective order. Every rank of a process group must issue the group's collectives in the same order, but rank p
and its mirror may finish their units in different orders. So each unit gets its own *lane*, a process group of
its own over the same two ranks (``build_mirror_lanes``; units sorted by their chunks give the lane, identically
on both ranks), and within a lane the buckets go in a fixed order: no lane ever sees two ranks pairing different
tensors, whatever the timing.

Bitwise: the sum of two copies is elementwise a + b, and fp32 addition of two terms is commutative, so buckets
(instead of one flat buffer at the end) give bitwise the gradients of the old sum (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from raymoe.parallel.groups import grad_or_zeros
from raymoe.parallel.stage_plan import PipelineStage
from raymoe.schedule import Action, Kind, Placement

NUM_LANES = 3
"""A DualPipe rank holds two chunks: each chunk's own parameters, plus the embedding two chunks share."""

BUCKET_BYTES = 4 << 20


def build_mirror_lanes(mirror_groups: Sequence[Sequence[int]], rank: int, num_lanes: int = NUM_LANES) -> tuple:
    """One process group per lane over each mirror pair; this rank's lanes (``None`` where it has no mirror).

    Collective over the world like every ``new_group``: every rank calls it with the same ``mirror_groups``.
    """
    lanes = []
    for _ in range(num_lanes):
        mine = None
        for ranks in mirror_groups:
            if len(ranks) == 1:
                continue
            group = dist.new_group(list(ranks))
            if rank in ranks:
                mine = group
        lanes.append(mine)
    return tuple(lanes)


def parameter_chunks(stage: PipelineStage) -> dict[str, frozenset[int]]:
    """Parameter name -> the chunks whose forward (and backward) use it."""
    last = stage.plan.last_chunk
    chunk_of_layer = {i: c for c in range(stage.plan.num_chunks) for i in stage.plan.layers_of(c)}
    out = {}
    for name, _ in stage.named_parameters():
        head, _, rest = name.partition(".")
        if head == "layers":
            out[name] = frozenset({chunk_of_layer[int(rest.partition(".")[0])]})
        elif head == "embed":
            users = {0} if stage.holds_first else set()
            if stage.holds_last and stage.mtp_depth > 0:
                users.add(last)
            out[name] = frozenset(users)
        else:  # the final norm, the output head, the MTP modules
            out[name] = frozenset({last})
    return out


def final_passes(actions: Sequence[Action], placement: Placement) -> tuple[int, dict[int, int]]:
    """(number of backward passes, chunk -> index of the last pass that touches it) of one rank's list."""
    last: dict[int, int] = {}
    index = 0
    for action in actions:
        if action.kind in (Kind.B, Kind.I, Kind.W, Kind.FB):
            stage = action.parts()[-1].stage  # an FB's backward half
            last[placement.info(stage).chunk] = index
            index += 1
    return index, last


class MirrorGradSync:
    """Sums this rank's mirrored gradients with its mirror's, each unit as soon as the action list makes it final."""

    def __init__(self, *, stage: PipelineStage, names: Sequence[str], actions: Sequence[Action],
                 placement: Placement, lanes: Sequence, bucket_bytes: int = BUCKET_BYTES) -> None:
        named = dict(stage.named_parameters())
        chunks_of = parameter_chunks(stage)
        units: dict[frozenset[int], list[str]] = {}
        for name in sorted(names):
            units.setdefault(chunks_of[name], []).append(name)
        if len(units) > len(lanes):
            raise ValueError(f"{len(units)} gradient units ({sorted(map(sorted, units))}) but {len(lanes)} lanes")
        self.num_passes, last_pass = final_passes(actions, placement)
        self._units = []  # (its chunks, final pass index, lane, buckets of parameters), in lane order
        for lane, chunks in enumerate(sorted(units, key=sorted)):
            missing = sorted(chunks - set(last_pass))
            if missing:
                raise ValueError(f"chunks {missing} have no backward pass in this rank's action list")
            params = [named[n] for n in units[chunks]]
            self._units.append((tuple(sorted(chunks)), max(last_pass[c] for c in chunks), lanes[lane],
                                _buckets(params, bucket_bytes)))
        self._passes = 0
        self._pending: list[tuple[dist.Work | None, torch.Tensor, list[torch.nn.Parameter]]] = []
        self.issued_after: list[tuple[tuple[int, ...], int]] = []
        """This step's (unit's chunks, backward passes done when its sums started), for tests and benchmarks."""

    def begin_step(self) -> None:
        self._passes = 0
        self._pending.clear()
        self.issued_after.clear()

    def after_backward(self) -> None:
        """The executor finished one backward pass: start the sums of the units it made final."""
        done = self._passes
        self._passes += 1
        for chunks, final, lane, buckets in self._units:
            if final == done:
                self._issue(chunks, lane, buckets)

    def finish(self) -> None:
        """Wait for every sum and write it back into ``.grad`` (before the optimizer reads them)."""
        if self._passes != self.num_passes:
            raise RuntimeError(f"mirror gradient sync saw {self._passes} backward passes, the action list has "
                               f"{self.num_passes}: gradients may have been summed before they were final")
        for work, flat, params in self._pending:
            if work is not None:
                work.wait()
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        self._pending.clear()

    def _issue(self, chunks: tuple[int, ...], lane, buckets: list[list[torch.nn.Parameter]]) -> None:
        self.issued_after.append((chunks, self._passes))
        for params in buckets:
            flat = torch.cat([grad_or_zeros(p).reshape(-1) for p in params])
            work = dist.all_reduce(flat, group=lane, async_op=True) if lane is not None else None
            self._pending.append((work, flat, params))


def _buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of ``params`` of at most ``bucket_bytes`` each (one larger parameter alone)."""
    buckets, current, size = [], [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets
