"""Measured pipeline timings: what every rank computed, when, and how much of the step it sat idle.

Workers time each compute action of their action list (F, B, I, W, FB) in seconds since the start of the step
on their own clock. From one step's timings of all ranks:

* ``makespan`` = the latest end over all ranks (every rank's clock starts at its step start, as in the
  simulator, so idle time before a rank's first action counts as bubble: that is the pipeline warm-up);
* ``busy_r`` = the time rank r spent in compute actions (the union of their intervals, so actions that a GPU
  overlaps on two streams are not counted twice);
* ``bubble_fraction_r`` = 1 - busy_r / makespan: the share of the step rank r was not computing (waiting for
  activations or gradients, or done early). This is the simulator's per-rank bubble divided by the makespan.

``simulated_costs`` turns the measured mean durations per kind into simulator costs, so the simulated
timeline of the same schedule can be drawn on the same time axis as the measured one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import fmean

COMPUTE_KINDS = ("F", "B", "I", "W", "FB")


@dataclass(frozen=True, kw_only=True)
class TimedAction:
    """One compute action of one rank in one step; also one line of ``actions.jsonl``."""

    step: int
    rank: int
    """Pipeline rank (position in the pipeline), the row of a timeline."""
    kind: str
    stage: int
    microbatch: int
    start: float
    """Seconds since the rank's step start."""
    end: float

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"action {self.kind} of stage {self.stage}, micro-batch {self.microbatch} on rank "
                             f"{self.rank} ends ({self.end}) before it starts ({self.start})")

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"step": self.step, "rank": self.rank, "kind": self.kind, "stage": self.stage,
                "microbatch": self.microbatch, "start": self.start, "end": self.end}

    @classmethod
    def from_dict(cls, row: dict) -> TimedAction:
        return cls(step=int(row["step"]), rank=int(row["rank"]), kind=str(row["kind"]), stage=int(row["stage"]),
                   microbatch=int(row["microbatch"]), start=float(row["start"]), end=float(row["end"]))


@dataclass(frozen=True, kw_only=True)
class StepTimings:
    """Busy time and bubble of every rank in one step."""

    step: int
    makespan: float
    busy: dict[int, float]
    bubble_fraction: dict[int, float]

    @property
    def mean_bubble_fraction(self) -> float:
        return fmean(self.bubble_fraction.values()) if self.bubble_fraction else 0.0


def step_timings(actions: Iterable[TimedAction], *, ranks: Sequence[int] = ()) -> StepTimings:
    """Bubble statistics of one step; ``ranks`` lists ranks that ran nothing (bubble 1) too."""
    actions = [a for a in actions if a.kind in COMPUTE_KINDS]
    steps = {a.step for a in actions}
    if len(steps) > 1:
        raise ValueError(f"step_timings takes the actions of one step, got steps {sorted(steps)}")
    makespan = max((a.end for a in actions), default=0.0)
    intervals: dict[int, list[tuple[float, float]]] = {r: [] for r in ranks}
    for a in actions:
        intervals.setdefault(a.rank, []).append((a.start, a.end))
    busy = {r: _union_length(spans) for r, spans in intervals.items()}
    bubble = {r: (1.0 - b / makespan if makespan > 0 else 0.0) for r, b in sorted(busy.items())}
    return StepTimings(step=steps.pop() if steps else -1, makespan=makespan, busy=dict(sorted(busy.items())),
                       bubble_fraction=bubble)


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def group_by_step(actions: Iterable[TimedAction]) -> dict[int, list[TimedAction]]:
    by_step: dict[int, list[TimedAction]] = {}
    for a in actions:
        by_step.setdefault(a.step, []).append(a)
    return dict(sorted(by_step.items()))


def mean_durations(actions: Iterable[TimedAction]) -> dict[str, float]:
    """Mean seconds per compute kind."""
    durations: dict[str, list[float]] = {}
    for a in actions:
        if a.kind in COMPUTE_KINDS:
            durations.setdefault(a.kind, []).append(a.duration)
    return {k: fmean(v) for k, v in durations.items()}


def simulated_costs(means: dict[str, float]) -> dict[str, float]:
    """Keyword arguments for ``raymoe.schedule.Costs`` (f, b, w, fb) from measured mean durations.

    A schedule that splits the backward (I then W) measures I and W; the full backward B is their sum. Kinds a
    schedule never runs get a harmless value that keeps ``w <= b`` (they are not used by that schedule).
    """
    f = means.get("F", 0.0)
    if "B" in means:
        b = means["B"]
    elif "I" in means or "W" in means:
        b = means.get("I", 0.0) + means.get("W", 0.0)
    else:
        b = 2 * f
    w = min(means.get("W", b / 2), b)
    costs = {"f": f, "b": b, "w": w}
    if "FB" in means:
        costs["fb"] = means["FB"]
    return costs
