"""One step of a pipeline schedule, its text form, and CSV files of per-rank action lists.

A schedule is data: for every pipeline rank an ordered list of ``Action`` values. The order of a rank's list
is the order in which that rank executes them. Compute actions name a *stage* (a global stage index, see
``placement.py``) and a *micro-batch* (a global micro-batch index, ``0 .. num_microbatches-1``):

    text       kind      meaning
    0F3        F         forward of stage 0 on micro-batch 3 (the last stage of a chain also computes the loss)
    0B3        B         full backward: gradient w.r.t. the stage input *and* its weights
    0I3        I         backward for the input only (zero-bubble split); its weight half comes later as W
    0W3        W         backward for the weights of an earlier ``0I3``
    0F5&7B1    FB        one overlapped chunk: forward of stage 0 on micro-batch 5 computed together with the
                         full backward of stage 7 on micro-batch 1 (DualPipe's "F&B"; costs one F&B)
    0SEND_F3   SEND_F    stage 0 sends its forward output of micro-batch 3 to the rank of the next stage
    1RECV_F3   RECV_F    stage 1 receives its input of micro-batch 3 from the rank of the previous stage
    1SEND_B3   SEND_B    stage 1 sends the gradient w.r.t. its input of micro-batch 3 to the previous stage's rank
    0RECV_B3   RECV_B    stage 0 receives the gradient w.r.t. its output of micro-batch 3 from the next stage's rank

Communication actions always name the stage that lives on the rank holding the list (the sender for SEND_*, the
receiver for RECV_*), as in PyTorch's ``torch.distributed.pipelining`` text form; the peer rank follows from
the placement (``Schedule.peer``). Transfers between two stages on the same rank have no SEND/RECV: the
executor hands the tensor over in memory.

The executor contract (checked by ``raymoe.schedule.checks``; see docs/schedules.md):

1. Execute each rank's list in order.
2. A maximal run of consecutive communication actions is one *batch*: post it at once (one
   ``batch_isend_irecv``). The lists are proven deadlock-free even for the strictest executor, one that waits
   for the whole batch, sends included, before going on, where a send completes only once the peer has posted
   the matching receive: no rank ever blocks on a transfer whose other half its peer posts only after a
   blocking wait of its own on this rank. A lazier executor (waits for a receive just before the compute that
   consumes it, for sends at the end of the step; the recommended one, and the simulator's time model) waits
   for a subset of the same events and is therefore safe too.
3. For each ordered pair of ranks (a, b), the i-th SEND on a addressed to b matches the i-th RECV on b from a, and
   both name the same transfer (``SEND_F`` of stage s with ``RECV_F`` of stage s+1 on the same micro-batch,
   ``SEND_B`` of stage s with ``RECV_B`` of stage s-1). Matching by order is what NCCL does; no tags needed.
4. Every receive a compute action needs comes earlier in the list (possibly prefetched several computes
   earlier); every send comes after the compute that produced its tensor. ``W`` runs the deferred weight
   gradient of the ``I`` with the same stage and micro-batch, earlier on the same rank (not a FIFO pop).
"""

from __future__ import annotations

import csv
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class Kind(enum.Enum):
    F = "F"
    B = "B"
    I = "I"  # noqa: E741 - the paper's name
    W = "W"
    FB = "FB"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_comm(self) -> bool:
        return self in _COMM_KINDS

    @property
    def is_send(self) -> bool:
        return self in (Kind.SEND_F, Kind.SEND_B)


_COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})
# Longer names first so that "SEND_F" is not read as "S" + ... and "F" does not swallow "FB".
_SIMPLE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


@dataclass(frozen=True, kw_only=True)
class Action:
    """One entry of a rank's action list; ``str(action)`` is its text form (module docstring).

    For ``Kind.FB``, ``stage``/``microbatch`` name the forward half and ``b_stage``/``b_microbatch`` the
    (full) backward half; the two halves are independent and the executor may run them overlapped (DualPipe's
    ``overlapped_forward_backward``) or one after the other, forward first. Every other kind leaves the ``b_``
    fields ``None``.
    """

    kind: Kind
    stage: int
    microbatch: int
    b_stage: int | None = None
    b_microbatch: int | None = None

    def __post_init__(self) -> None:
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"stage and microbatch must be >= 0, got stage={self.stage}, "
                             f"microbatch={self.microbatch}")
        paired = self.b_stage is not None and self.b_microbatch is not None
        if self.kind is Kind.FB:
            if not paired or self.b_stage < 0 or self.b_microbatch < 0:
                raise ValueError(f"an FB action needs b_stage >= 0 and b_microbatch >= 0, got "
                                 f"b_stage={self.b_stage}, b_microbatch={self.b_microbatch}")
        elif self.b_stage is not None or self.b_microbatch is not None:
            raise ValueError(f"only FB actions have b_stage/b_microbatch, got kind {self.kind.value}")

    @property
    def is_comm(self) -> bool:
        return self.kind.is_comm

    @property
    def is_compute(self) -> bool:
        return not self.kind.is_comm

    def parts(self) -> tuple[Action, ...]:
        """The single-kind computations this action performs: (F, B) for an FB, else (self,)."""
        if self.kind is not Kind.FB:
            return (self,)
        return (Action(kind=Kind.F, stage=self.stage, microbatch=self.microbatch),
                Action(kind=Kind.B, stage=self.b_stage, microbatch=self.b_microbatch))

    def __str__(self) -> str:
        if self.kind is Kind.FB:
            return f"{self.stage}F{self.microbatch}&{self.b_stage}B{self.b_microbatch}"
        return f"{self.stage}{self.kind.value}{self.microbatch}"


def act(kind: Kind | str, stage: int, microbatch: int) -> Action:
    """Short constructor for single-kind actions: ``act("F", 0, 3)`` is ``0F3``."""
    return Action(kind=Kind(kind), stage=stage, microbatch=microbatch)


def overlapped(f_stage: int, f_microbatch: int, b_stage: int, b_microbatch: int) -> Action:
    """An FB action: forward of (f_stage, f_microbatch) overlapped with the backward of (b_stage, b_microbatch)."""
    return Action(kind=Kind.FB, stage=f_stage, microbatch=f_microbatch, b_stage=b_stage, b_microbatch=b_microbatch)


def parse_action(text: str) -> Action:
    """Parse one action's text form (``0F3``, ``2SEND_B1``, ``0F5&7B1``); ValueError names bad text."""
    text = text.strip()
    if "&" in text:
        halves = text.split("&")
        if len(halves) != 2:
            raise ValueError(f"cannot parse action {text!r}: an FB action has exactly one '&'")
        f, b = (parse_action(h) for h in halves)
        if f.kind is not Kind.F or b.kind is not Kind.B:
            raise ValueError(f"cannot parse action {text!r}: an FB action is '<stage>F<mb>&<stage>B<mb>'")
        return overlapped(f.stage, f.microbatch, b.stage, b.microbatch)
    match = _SIMPLE.match(text)
    if match is None:
        raise ValueError(f"cannot parse action {text!r}: expected <stage><kind><microbatch> with kind one of "
                         f"F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B, e.g. '0F3', or '0F5&7B1'")
    stage, kind, microbatch = match.groups()
    return act(kind, int(stage), int(microbatch))


def parse_actions(text: str) -> list[Action]:
    """Parse a comma- or whitespace-separated list of actions (the golden-test form)."""
    return [parse_action(tok) for tok in re.split(r"[,\s]+", text.strip()) if tok]


def format_actions(actions: Iterable[Action]) -> str:
    return ",".join(str(a) for a in actions)


def write_csv(actions: Mapping[int, Sequence[Action]], path: str | Path) -> None:
    """One row per rank (row i is rank i), one action per cell: torchtitan's CSV schedule layout."""
    ranks = sorted(actions)
    if ranks != list(range(len(ranks))):
        raise ValueError(f"ranks must be 0..{len(ranks) - 1}, got {ranks}")
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        for rank in ranks:
            writer.writerow([str(a) for a in actions[rank]])


def read_csv(path: str | Path) -> dict[int, list[Action]]:
    """Read ``write_csv``'s layout; blank cells are skipped (so hand-aligned spreadsheets load too)."""
    result: dict[int, list[Action]] = {}
    with open(path, newline="") as fh:
        for rank, row in enumerate(csv.reader(fh)):
            try:
                result[rank] = [parse_action(cell) for cell in row if cell.strip()]
            except ValueError as exc:
                raise ValueError(f"{path}, row {rank + 1} (rank {rank}): {exc}") from exc
    if not result:
        raise ValueError(f"{path} holds no action rows")
    return result


def batches_and_computes(acts: Sequence[Action]) -> list[Action | list[Action]]:
    """A rank's list as its compute actions and its batches (lists of consecutive SEND/RECV actions)."""
    out: list = []
    for a in acts:
        if a.is_comm:
            if out and isinstance(out[-1], list):
                out[-1].append(a)
            else:
                out.append([a])
        else:
            out.append(a)
    return out

