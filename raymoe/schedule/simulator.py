"""Simulate a schedule with per-kind (optionally per-chunk) costs: makespan, bubbles, live activations, parameters.

Time model (one clock per rank, all costs in the same arbitrary unit):

* a compute action occupies its rank for its cost: F = ``f``, B = ``b``, W = ``w``, I = ``b - w`` (the full
  backward minus its weight half), FB = ``fb`` (one overlapped F&B chunk; default ``f + b``, no overlap gain).
  ``Costs.per_chunk`` can override these for the actions on one chunk of the model, ``{("F", 3): 1.4}``, e.g.
  because the last chunk also computes the output head and the loss; ``simulate(..., durations=)`` overrides them
  per action (a replay of measured timings);
* a batch of SEND/RECV actions takes no rank time: its sends are posted at the rank's current time and do not
  hold the sender up; a compute action starts once its rank is free and each receive it consumes has arrived,
  ``p2p`` after both its ends were posted (the send, and the batch on this rank holding the receive). NCCL and
  gloo both move a message only once its receive is posted too, and the generated lists post a receive right
  before the compute that consumes it, so with ``p2p > 0`` that compute pays the latency even when the sender
  finished long before. With ``p2p = 0`` the model is pure data flow.

This is the executor docs/schedules.md recommends: post each batch at once, wait for a receive right before the
compute that consumes it, for sends only when their buffers are needed again. With zero latency it is also pure
data flow, which is what the DualPipe README's formulas assume. ``makespan_blocking_sends`` times the strictest
executor instead (each batch waits until every peer has posted its half, sends included: deepseek-ai/DualPipe's
``_commit_and_wait_comm``); the lists are proven deadlock-free for that one too (``checks.py``), but a busy
receiver then stalls its sender.

What the numbers mean:

* ``makespan``: time from the first action to the last, over all ranks (every rank starts at 0).
* ``per_rank[r].bubble``: the time rank r is idle within the makespan, ``makespan - busy_r``, where busy_r is the
  summed cost of its compute actions. ``bubble`` is the largest of these; ``mean_bubble`` their average. The
  DualPipe README table gives this per-rank idle time (see docs/schedules.md for when its formulas are exact).
* ``peak_activations``: the most micro-batch activations a rank holds at once, in units of one stage's activations
  for one micro-batch. F(s, m) adds one unit when it starts; the backward for the input (B or I) of (s, m) frees
  it (W needs only the small weight-gradient inputs). The forward half of an FB counts before its backward half
  frees, so an FB can be a peak.
* ``param_copies``: parameters per rank in units of one stage's parameters (the table's "Parameter Per Device":
  1 for one stage per rank, 2 for DualPipe/DualPipeV); ``model_fraction_per_rank`` is the same in units of the
  whole model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from raymoe.schedule.action import Action, Kind, batches_and_computes
from raymoe.schedule.checks import ScheduleError, check_schedule
from raymoe.schedule.comms import matching, needed_receives

COST_KEYS = ("F", "B", "W", "FB", "P2P")
CHUNK_COST_KINDS = ("F", "B", "I", "W", "FB")


@dataclass(frozen=True, kw_only=True)
class Costs:
    f: float = 1.0
    """Forward of one stage on one micro-batch."""
    b: float = 2.0
    """Full backward (input and weight gradients)."""
    w: float = 1.0
    """Backward for the weights alone; the backward for the input costs ``b - w``."""
    fb: float | None = None
    """One overlapped F&B chunk; None means ``f + b`` (no gain from overlapping)."""
    p2p: float = 0.0
    """Latency of one point-to-point transfer, counted from the moment both its ends are posted."""
    per_chunk: Mapping[tuple[str, int], float] = field(default_factory=dict, hash=False)
    """``(kind, chunk) -> cost`` for kind F, B, I, W or FB: overrides the per-kind cost of the actions on that
    chunk (``StageInfo.chunk``, which layers the stage computes, so DualPipe's two copies of a chunk share it).
    An FB is keyed by its forward half's chunk (which fixes its backward half's in DualPipe and DualPipeV), an I
    by its own chunk (without an entry it costs ``b - w``). Kinds without an entry keep the per-kind cost."""

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "p2p"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost {name.upper()} must be >= 0, got {getattr(self, name)}")
        if self.w > self.b:
            raise ValueError(f"cost W={self.w} must be <= B={self.b}: W is the weight half of the full backward")
        if self.fb is not None and self.fb < 0:
            raise ValueError(f"cost FB must be >= 0, got {self.fb}")
        for key, value in self.per_chunk.items():
            kind, chunk = key if isinstance(key, tuple) and len(key) == 2 else (None, None)
            if kind not in CHUNK_COST_KINDS or not isinstance(chunk, int) or chunk < 0:
                raise ValueError(f"per-chunk cost key {key!r}: expected (kind, chunk) with kind one of "
                                 f"{list(CHUNK_COST_KINDS)} and chunk an int >= 0")
            if value < 0:
                raise ValueError(f"per-chunk cost {kind}@{chunk} must be >= 0, got {value}")
        # a private sorted copy: the caller's dict may change later, and str() lists the entries in order
        ordered = sorted(self.per_chunk.items(), key=lambda item: (item[0][1], CHUNK_COST_KINDS.index(item[0][0])))
        object.__setattr__(self, "per_chunk", dict(ordered))

    @property
    def i(self) -> float:
        return self.b - self.w

    @property
    def overlapped(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    def of(self, action: Action, chunk: int | None = None) -> float:
        """Cost of ``action``; ``chunk`` (its stage's ``StageInfo.chunk``) selects a per-chunk entry if any."""
        if chunk is not None:
            cost = self.per_chunk.get((action.kind.value, chunk))
            if cost is not None:
                return cost
        return {Kind.F: self.f, Kind.B: self.b, Kind.I: self.i, Kind.W: self.w,
                Kind.FB: self.overlapped}[action.kind]

    @classmethod
    def parse(cls, text: str) -> Costs:
        """``"F=1,B=2,W=1,FB=3,P2P=0,F@3=1.5"`` (any subset, case-insensitive) -> Costs; ValueError names bad items.

        ``KIND@CHUNK=VALUE`` (KIND one of F, B, I, W, FB) is a ``per_chunk`` entry."""
        values: dict[str, float] = {}
        per_chunk: dict[tuple[str, int], float] = {}
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().upper()
            kind, at, chunk = key.partition("@")
            if not sep or (not at and key not in COST_KEYS) or (
                    at and (kind not in CHUNK_COST_KINDS or not chunk.isdigit())):
                raise ValueError(f"bad cost item {item!r}: expected KEY=VALUE with KEY one of {list(COST_KEYS)}, "
                                 f"or KIND@CHUNK=VALUE with KIND one of {list(CHUNK_COST_KINDS)}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"bad cost item {item!r}: {value.strip()!r} is not a number") from None
            if at:
                per_chunk[kind, int(chunk)] = number
            else:
                values[key.lower()] = number
        return cls(**values, per_chunk=per_chunk)

    def __str__(self) -> str:
        chunks = "".join(f",{kind}@{chunk}={cost:g}" for (kind, chunk), cost in self.per_chunk.items())
        return f"F={self.f:g},B={self.b:g},W={self.w:g},FB={self.overlapped:g},P2P={self.p2p:g}{chunks}"


@dataclass(frozen=True, kw_only=True)
class Event:
    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True, kw_only=True)
class RankStats:
    rank: int
    busy: float
    bubble: float
    end: float
    peak_activations: int


@dataclass(frozen=True, kw_only=True)
class SimResult:
    schedule_name: str
    pp: int
    num_microbatches: int
    costs: Costs
    makespan: float
    per_rank: tuple[RankStats, ...]
    events: tuple[Event, ...]
    param_copies: int
    model_fraction_per_rank: float
    makespan_blocking_sends: float
    """The makespan for an executor that waits for its sends too (rendezvous): see the module docstring."""

    @property
    def bubble(self) -> float:
        return max(s.bubble for s in self.per_rank)

    @property
    def mean_bubble(self) -> float:
        return sum(s.bubble for s in self.per_rank) / len(self.per_rank)

    @property
    def peak_activations(self) -> int:
        return max(s.peak_activations for s in self.per_rank)

    def to_dict(self) -> dict:
        return {
            "schedule": self.schedule_name, "pp": self.pp, "num_microbatches": self.num_microbatches,
            "costs": str(self.costs), "makespan": self.makespan, "bubble": self.bubble,
            "mean_bubble": self.mean_bubble, "peak_activations": self.peak_activations,
            "param_copies": self.param_copies, "model_fraction_per_rank": self.model_fraction_per_rank,
            "makespan_blocking_sends": self.makespan_blocking_sends,
            "per_rank": [{"rank": s.rank, "busy": s.busy, "bubble": s.bubble, "end": s.end,
                          "peak_activations": s.peak_activations} for s in self.per_rank],
        }


def simulate(schedule, costs: Costs, *, check: bool = True,
             durations: Mapping[Action, float] | None = None) -> SimResult:
    """Check ``schedule`` (unless told it already was) and time it under ``costs``.

    ``durations[action]``, where given, replaces the cost of that compute action (e.g. its measured
    duration in one step, to replay a measured run through this time model); ``costs`` still gives the rest
    and ``p2p``."""
    if check:
        check_schedule(schedule)
    cost_of = _cost_function(schedule.placement, costs, durations or {})
    events = _run(schedule, cost_of, costs.p2p, rendezvous=False)
    makespan = max((e.end for e in events), default=0.0)
    per_rank = []
    for r in range(schedule.pp):
        mine = [e for e in events if e.rank == r]
        busy = sum(e.end - e.start for e in mine)
        per_rank.append(RankStats(rank=r, busy=busy, bubble=makespan - busy,
                                  end=max((e.end for e in mine), default=0.0),
                                  peak_activations=peak_live(schedule.compute_actions(r))))
    placement = schedule.placement
    return SimResult(
        schedule_name=schedule.name, pp=schedule.pp, num_microbatches=schedule.num_microbatches, costs=costs,
        makespan=makespan, per_rank=tuple(per_rank), events=tuple(events),
        param_copies=placement.param_units_per_rank,
        model_fraction_per_rank=placement.param_units_per_rank / placement.num_chunks,
        makespan_blocking_sends=max((e.end for e in _run(schedule, cost_of, costs.p2p, rendezvous=True)),
                                    default=0.0),
    )


def _cost_function(placement, costs: Costs, durations: Mapping[Action, float]):
    def cost_of(action: Action) -> float:
        measured = durations.get(action)
        if measured is not None:
            return measured
        return costs.of(action, placement.info(action.stage).chunk if costs.per_chunk else None)

    return cost_of


def peak_live(actions) -> int:
    """Most (stage, micro-batch) activations alive at once on one rank (see the module docstring)."""
    live = peak = 0
    for a in actions:
        for part in a.parts():
            if part.kind is Kind.F:
                live += 1
                peak = max(peak, live)
            elif part.kind in (Kind.B, Kind.I):
                live -= 1
    return peak


def _run(schedule, cost_of, p2p: float, *, rendezvous: bool) -> list[Event]:
    placement = schedule.placement
    segments = {r: batches_and_computes(schedule.actions[r]) for r in range(schedule.pp)}
    where = {op: (r, k) for r, segs in segments.items() for k, seg in enumerate(segs)
             if isinstance(seg, list) for op in seg}
    position = dict.fromkeys(segments, 0)
    clock = dict.fromkeys(segments, 0.0)
    posted_at: dict[tuple[int, int], float] = {}  # (rank, batch index) -> time the rank reached it
    events: list[Event] = []
    progress = True
    while progress:
        progress = False
        for r, segs in segments.items():
            while position[r] < len(segs):
                k, seg = position[r], segs[position[r]]
                if isinstance(seg, Action):
                    start = clock[r]
                    if not rendezvous:  # wait for this compute's receives only, each p2p after both ends posted
                        pairs = [(where[op], where[matching(op, placement)])
                                 for op in needed_receives(seg, r, placement)]
                        if any(send not in posted_at for _, send in pairs):
                            break
                        start = max([start] + [max(posted_at[recv], posted_at[send]) + p2p for recv, send in pairs])
                    clock[r] = start + cost_of(seg)
                    events.append(Event(rank=r, action=seg, start=start, end=clock[r]))
                else:
                    posted_at.setdefault((r, k), clock[r])
                    if rendezvous:  # each transfer starts once both ends are posted; the rank waits for all
                        partners = [where[matching(op, placement)] for op in seg]
                        if any(p not in posted_at for p in partners):
                            break
                        clock[r] = max(max(posted_at[r, k], posted_at[p]) + p2p for p in partners)
                position[r] += 1
                progress = True
    stuck = [r for r in segments if position[r] < len(segments[r])]
    if stuck:
        raise ScheduleError("the timing run got stuck (deadlock) at ranks "
                            + ", ".join(f"{r} before {segments[r][position[r]]}" for r in stuck))
    return events
