"""Simulate a schedule with per-kind costs: makespan, bubbles, live activations, parameters.

Time model (one clock per rank, all costs in the same arbitrary unit):

* a compute action occupies its rank for its cost: F = ``f``, B = ``b``, W = ``w``, I = ``b - w`` (the full
  backward minus its weight half), FB = ``fb`` (one overlapped F&B chunk; default ``f + b``, no overlap gain);
* a batch of SEND/RECV actions takes no rank time: its sends are posted at the rank's current time and do not
  hold the sender up; a compute action starts once its rank is free and each receive it consumes has arrived,
  ``p2p`` after the matching send was posted.

This is the executor docs/schedules.md recommends: post each batch at once, wait for a receive right before the
compute that consumes it, for sends only when their buffers are needed again. It is also pure data flow, which
is what the DualPipe README's formulas assume. ``makespan_blocking_sends`` times the strictest executor instead
(each batch waits until every peer has posted its half, sends included: deepseek-ai/DualPipe's
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

from dataclasses import dataclass

from raymoe.schedule.action import Action, Kind, batches_and_computes
from raymoe.schedule.checks import ScheduleError, check_schedule
from raymoe.schedule.comms import matching, needed_receives

COST_KEYS = ("F", "B", "W", "FB", "P2P")


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
    """Latency of one point-to-point transfer."""

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "p2p"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost {name.upper()} must be >= 0, got {getattr(self, name)}")
        if self.w > self.b:
            raise ValueError(f"cost W={self.w} must be <= B={self.b}: W is the weight half of the full backward")
        if self.fb is not None and self.fb < 0:
            raise ValueError(f"cost FB must be >= 0, got {self.fb}")

    @property
    def i(self) -> float:
        return self.b - self.w

    @property
    def overlapped(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    def of(self, action: Action) -> float:
        return {Kind.F: self.f, Kind.B: self.b, Kind.I: self.i, Kind.W: self.w,
                Kind.FB: self.overlapped}[action.kind]

    @classmethod
    def parse(cls, text: str) -> Costs:
        """``"F=1,B=2,W=1,FB=3,P2P=0"`` (any subset, case-insensitive) -> Costs; ValueError names bad items."""
        values: dict[str, float] = {}
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().upper()
            if not sep or key not in COST_KEYS:
                raise ValueError(f"bad cost item {item!r}: expected KEY=VALUE with KEY one of {list(COST_KEYS)}")
            try:
                values[key.lower()] = float(value)
            except ValueError:
                raise ValueError(f"bad cost item {item!r}: {value.strip()!r} is not a number") from None
        return cls(**values)

    def __str__(self) -> str:
        return f"F={self.f:g},B={self.b:g},W={self.w:g},FB={self.overlapped:g},P2P={self.p2p:g}"


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


def simulate(schedule, costs: Costs, *, check: bool = True) -> SimResult:
    """Check ``schedule`` (unless told it already was) and time it under ``costs``."""
    if check:
        check_schedule(schedule)
    events = _run(schedule, costs, rendezvous=False)
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
        makespan_blocking_sends=max((e.end for e in _run(schedule, costs, rendezvous=True)), default=0.0),
    )


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


def _run(schedule, costs: Costs, *, rendezvous: bool) -> list[Event]:
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
                    if not rendezvous:  # wait for this compute's receives only
                        sends = [where[matching(op, placement)] for op in needed_receives(seg, r, placement)]
                        if any(p not in posted_at for p in sends):
                            break
                        start = max([start] + [posted_at[p] + costs.p2p for p in sends])
                    clock[r] = start + costs.of(seg)
                    events.append(Event(rank=r, action=seg, start=start, end=clock[r]))
                else:
                    posted_at.setdefault((r, k), clock[r])
                    if rendezvous:  # each transfer starts once both ends are posted; the rank waits for all
                        partners = [where[matching(op, placement)] for op in seg]
                        if any(p not in posted_at for p in partners):
                            break
                        clock[r] = max(max(posted_at[r, k], posted_at[p]) + costs.p2p for p in partners)
                position[r] += 1
                progress = True
    stuck = [r for r in segments if position[r] < len(segments[r])]
    if stuck:
        raise ScheduleError("the timing run got stuck (deadlock) at ranks "
                            + ", ".join(f"{r} before {segments[r][position[r]]}" for r in stuck))
    return events
