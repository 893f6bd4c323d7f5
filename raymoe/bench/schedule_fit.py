"""Fit the pipeline simulator's cost model to measured action timings, and replay measured steps through it.

Every worker's ``StepResult`` carries the start and end of its compute actions on its own clock (``timings``,
seconds since ``timings_origin_s``). ``step_timeline`` puts one step's ranks on a common clock (zero = the
earliest rank's origin; the origins are ``time.perf_counter()`` values, comparable between processes of one
host) and pairs the i-th timing of rank r with rank r's i-th compute action of the schedule. From such timelines:

* ``per_kind_costs``: one mean cost per kind (F, B, W, FB) over every rank and chunk, I = B - W as the simulator
  models it, P2P 0: the coarse model, in which every chunk costs the same;
* ``per_chunk_costs``: the same per-kind means plus one mean per (kind, chunk) (``Costs.per_chunk``; the chunk
  holding the output head and MTP is heavier than the others) and ``p2p_latency``;
* ``p2p_latency``: the mean time from the moment a transfer could start to the moment its consumer started, over
  the computes for which the transfer alone explains the wait. A transfer can start once both ends are posted:
  a batch is posted right after the compute before it ends (the simulator's model), so its post time is that
  compute's measured end (or the rank's origin). A sample is taken only where the transfer could start no
  earlier than the rank became free (``ready >= previous end``): there the whole wait is the transfer's, while
  for a transfer that could start earlier the measurement says only that it took at most the head start;
* ``replay``: the simulator run with every action's own measured duration in one step (and the fitted ``p2p``).
  Measured / replayed isolates what the time model misses (idle gaps between actions, start skew); replayed /
  predicted is what averaging the costs loses (on an oversubscribed machine an action is slower while more ranks
  compute, and a makespan is a max over paths, so mean costs underestimate it).

Pure Python over ``raymoe.schedule``: the tests build timelines from simulated runs, no Ray.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from raymoe.schedule import Action, Costs, Schedule, batches_and_computes, matching, needed_receives, simulate


@dataclass(frozen=True, kw_only=True)
class Span:
    action: Action
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, kw_only=True)
class StepTimeline:
    """One measured step of one pipeline on a common clock (seconds since the earliest rank's origin)."""

    schedule: Schedule
    """The schedule whose actions ran."""
    origins: dict[int, float]
    """Pipeline rank -> when it started the step (>= 0; the largest is the start skew)."""
    spans: dict[int, tuple[Span, ...]]
    """Pipeline rank -> its compute actions in execution order."""

    @property
    def makespan(self) -> float:
        """From the first rank's start to the last compute action's end: the simulator's makespan, measured."""
        return max((s[-1].end for s in self.spans.values() if s), default=0.0)

    @property
    def skew(self) -> float:
        return max(self.origins.values(), default=0.0)


def step_timeline(schedule: Schedule, results: Iterable) -> StepTimeline:
    """``results``: one step's ``StepResult``s of one pipeline (``pp_rank``, ``timings``, ``timings_origin_s``)."""
    results = list(results)
    first = min(r.timings_origin_s for r in results)
    origins, spans = {}, {}
    for r in results:
        actions = schedule.compute_actions(r.pp_rank)
        measured = [(t.kind, t.stage, t.microbatch) for t in r.timings]
        expected = [(a.kind.value, a.stage, a.microbatch) for a in actions]
        if measured != expected:
            raise ValueError(f"rank {r.pp_rank} timed {len(measured)} actions that do not match the "
                             f"{len(expected)} compute actions of schedule {schedule.name}; first timings "
                             f"{measured[:3]}, first actions {expected[:3]}")
        origin = r.timings_origin_s - first
        origins[r.pp_rank] = origin
        spans[r.pp_rank] = tuple(Span(action=a, start=origin + t.start_s, end=origin + t.end_s)
                                 for a, t in zip(actions, r.timings))
    return StepTimeline(schedule=schedule, origins=origins, spans=spans)


def kind_means(timelines: Sequence[StepTimeline]) -> dict[str, float]:
    """Mean duration per action kind over every rank and step."""
    durations: dict[str, list[float]] = defaultdict(list)
    for tl in timelines:
        for spans in tl.spans.values():
            for s in spans:
                durations[s.action.kind.value].append(s.duration)
    return {kind: statistics.fmean(values) for kind, values in durations.items()}


def per_kind_costs(timelines: Sequence[StepTimeline]) -> Costs:
    """``Costs`` from the per-kind means; B = I + W where a schedule splits every backward, P2P 0."""
    means = kind_means(timelines)
    f, w = means.get("F", 0.0), means.get("W", 0.0)
    b = means["B"] if "B" in means else means.get("I", 0.0) + w
    return Costs(f=f, b=max(b, w), w=w, fb=means.get("FB"), p2p=0.0)


def chunk_means(timelines: Sequence[StepTimeline]) -> dict[tuple[str, int], float]:
    """Mean duration per (kind, chunk) over every step; an FB counts under its forward half's chunk."""
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    for tl in timelines:
        placement = tl.schedule.placement
        for spans in tl.spans.values():
            for s in spans:
                durations[s.action.kind.value, placement.info(s.action.stage).chunk].append(s.duration)
    return {key: statistics.fmean(values) for key, values in sorted(durations.items())}


def per_chunk_costs(timelines: Sequence[StepTimeline]) -> Costs:
    """The per-kind means, overridden per (kind, chunk) by that chunk's means, and the measured P2P latency."""
    base = per_kind_costs(timelines)
    return Costs(f=base.f, b=base.b, w=base.w, fb=base.fb, p2p=p2p_latency(timelines) or 0.0,
                 per_chunk=chunk_means(timelines))


def p2p_samples(timeline: StepTimeline) -> list[float]:
    """Per-message latencies observed in one step (module docstring: which waits count)."""
    schedule = timeline.schedule
    placement = schedule.placement
    posted: dict[Action, float] = {}  # SEND/RECV action -> when its batch was posted
    for r, spans in timeline.spans.items():
        clock, k = timeline.origins[r], 0
        for seg in batches_and_computes(schedule.actions[r]):
            if isinstance(seg, list):
                posted.update(dict.fromkeys(seg, clock))
            else:
                clock = spans[k].end
                k += 1
    samples = []
    for r, spans in timeline.spans.items():
        previous_end = timeline.origins[r]
        for s in spans:
            receives = needed_receives(s.action, r, placement)
            if receives:
                ready = max(max(posted[op], posted[matching(op, placement)]) for op in receives)
                if ready >= previous_end:
                    samples.append(s.start - ready)
            previous_end = s.end
    return samples


def p2p_latency(timelines: Sequence[StepTimeline]) -> float | None:
    """Mean per-message latency over every step; None when no transfer was observed (pp = 1)."""
    samples = [x for tl in timelines for x in p2p_samples(tl)]
    return statistics.fmean(samples) if samples else None


def replay(timeline: StepTimeline, costs: Costs) -> float:
    """The simulator's makespan with every action's measured duration in this step (P2P from ``costs``)."""
    durations = {s.action: s.duration for spans in timeline.spans.values() for s in spans}
    return simulate(timeline.schedule, costs, check=False, durations=durations).makespan
