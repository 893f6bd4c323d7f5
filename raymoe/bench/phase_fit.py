"""Measured phases: cut a step's compute actions at their expert all-to-alls, replay them, predict from them.

A worker's ``StepResult`` carries its compute actions (``timings``), every all-to-all it issued (``exchanges``:
issued / waited / done) and, with ``schedule.overlap_a2a``, the turns of its F&B pairs (``phases``), all on one
clock per rank. From one step of one pipeline:

* ``measured_programs``: each compute action as a ``ChunkProgram`` (``raymoe.schedule.phases``): the compute
  between its exchanges and each exchange's time from issue to result. An action alone yields one program; an
  overlapped pair yields its forward's and its backward's, turn by turn. (In a pair, an exchange that finished
  while the other chunk computed is only known to have finished by the time its chunk looked: an upper bound,
  which is exactly the information the turn order uses.) A pair run one half after the other is cut where its
  forward ended (``ActionTiming.forward_end_s``).
* ``replay_phases``: the simulator with every action's duration rebuilt from its measured phases (a pair by
  ``run_in_turns`` of its two measured programs): replayed vs measured checks that the turn model is the
  executor's;
* ``mean_programs``: one mean program per (kind, chunk) (over the actions that ran alone; from pair halves
  where a kind never runs alone), the per-phase costs to predict a layout with and without overlap
  (``predicted``), or at another compute:communication ratio (``at_ratio``).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from raymoe.schedule import Action, Kind, Schedule
from raymoe.schedule.phases import ChunkProgram, PhasedCosts, phased_costs, simulate_phased
from raymoe.schedule.simulator import SimResult


def _program(start: float, end: float, exchanges: Sequence) -> ChunkProgram:
    """The compute between ``exchanges`` (sorted by issue) within [start, end], and each exchange's time."""
    compute, a2a, t = [], [], start
    for e in exchanges:
        compute.append(max(e.issued_s - t, 0.0))
        a2a.append(max(e.done_s - e.issued_s, 0.0))
        t = e.done_s
    compute.append(max(end - t, 0.0))
    return ChunkProgram(compute=tuple(compute), a2a=tuple(a2a))


def measured_programs(schedule: Schedule, result) -> tuple[dict[Action, ChunkProgram],
                                                           dict[Action, tuple[ChunkProgram, ChunkProgram]]]:
    """(programs of the single-kind actions, (forward, backward) programs of the F&B pairs) of one rank's step."""
    actions = schedule.compute_actions(result.pp_rank)
    exchanges = sorted(result.exchanges, key=lambda e: e.issued_s)
    turns: dict[str, list] = defaultdict(list)
    for p in result.phases:
        turns[p.pair].append(p)
    alone: dict[Action, ChunkProgram] = {}
    pairs: dict[Action, tuple[ChunkProgram, ChunkProgram]] = {}
    for action, timing in zip(actions, result.timings):
        inside = [e for e in exchanges if timing.start_s <= e.issued_s <= timing.end_s]
        if action.kind is not Kind.FB:
            alone[action] = _program(timing.start_s, timing.end_s, inside)
            continue
        mine = turns.get(str(action))
        if mine:  # overlapped: turn by turn
            programs = []
            for part in ("F", "B"):
                compute = [p.end_s - p.start_s for p in sorted((p for p in mine if p.part == part),
                                                               key=lambda p: p.index)]
                a2a = [e.done_s - e.issued_s for e in inside if e.part == part]
                programs.append(ChunkProgram(compute=tuple(compute), a2a=tuple(a2a)))
            pairs[action] = (programs[0], programs[1])
        else:  # sequential: forward, then backward
            f_ex = [e for e in inside if e.part == "F"]
            b_ex = [e for e in inside if e.part == "B"]
            split = timing.forward_end_s if timing.forward_end_s is not None else (
                b_ex[0].issued_s if b_ex else timing.end_s)
            pairs[action] = (_program(timing.start_s, split, f_ex), _program(split, timing.end_s, b_ex))
    return alone, pairs


def step_phases(schedule: Schedule, results: Iterable, *, overlap: bool) -> PhasedCosts:
    """Every compute action of one pipeline's step, rebuilt from its measured phases (``overlap``: how the
    pairs ran)."""
    alone, pairs = {}, {}
    for r in results:
        a, p = measured_programs(schedule, r)
        alone.update(a)
        pairs.update(p)
    return phased_costs(schedule, alone.__getitem__, overlap=overlap, pair_programs=pairs)


def replay_phases(schedule: Schedule, results: Iterable, *, overlap: bool, p2p: float = 0.0) -> float:
    """The simulator's makespan with every action's duration rebuilt from its measured phases."""
    return simulate_phased(schedule, step_phases(schedule, results, overlap=overlap), p2p=p2p).makespan


def mean_programs(schedule: Schedule, steps: Sequence[Iterable]) -> dict[tuple[str, int], ChunkProgram]:
    """One mean program per (kind, chunk) over ``steps`` (each one pipeline's ``StepResult``s): from the actions
    that ran alone, and for a (kind, chunk) that only ran inside F&B pairs (DualPipe's B) from the pairs' halves.
    Positions are averaged over the programs of the most common length."""
    alone: dict[tuple[str, int], list[ChunkProgram]] = defaultdict(list)
    halves: dict[tuple[str, int], list[ChunkProgram]] = defaultdict(list)
    chunk = {s: schedule.placement.info(s).chunk for s in range(schedule.placement.num_stages)}
    for results in steps:
        for r in results:
            singles, pairs = measured_programs(schedule, r)
            for action, program in singles.items():
                alone[action.kind.value, chunk[action.stage]].append(program)
            for action, (f_prog, b_prog) in pairs.items():
                halves["F", chunk[action.stage]].append(f_prog)
                halves["B", chunk[action.b_stage]].append(b_prog)
    means = {}
    for key in sorted(set(alone) | set(halves)):
        programs = alone.get(key) or halves[key]
        length = Counter(len(p.a2a) for p in programs).most_common(1)[0][0]
        same = [p for p in programs if len(p.a2a) == length]
        means[key] = ChunkProgram(compute=tuple(statistics.fmean(c) for c in zip(*(p.compute for p in same))),
                                  a2a=tuple(statistics.fmean(a) for a in zip(*(p.a2a for p in same))))
    return means


def at_ratio(programs: dict[tuple[str, int], ChunkProgram], ratio: float) -> dict[tuple[str, int], ChunkProgram]:
    """The same compute with the exchanges rescaled so that each chunk's communication is ``ratio`` times its
    compute (spread over its exchanges as measured; evenly where none was measured)."""
    out = {}
    for key, p in programs.items():
        if not p.a2a:
            out[key] = p
            continue
        target = ratio * p.total_compute
        shares = [a / p.total_a2a for a in p.a2a] if p.total_a2a else [1 / len(p.a2a)] * len(p.a2a)
        out[key] = ChunkProgram(compute=p.compute, a2a=tuple(target * s for s in shares))
    return out


def predicted(schedule: Schedule, programs: dict[tuple[str, int], ChunkProgram], *, overlap: bool,
              p2p: float = 0.0) -> tuple[SimResult, PhasedCosts]:
    """The step the simulator predicts from per-(kind, chunk) programs (an I without its own falls back to the
    B of its chunk), and the phased costs it was timed with."""
    def program_of(action: Action) -> ChunkProgram:
        chunk = schedule.placement.info(action.stage).chunk
        found = programs.get((action.kind.value, chunk))
        if found is None and action.kind is Kind.I:
            found = programs.get(("B", chunk))
        if found is None:
            raise ValueError(f"no measured phases for {action.kind.value} on chunk {chunk}; measured "
                             f"{sorted(programs)}")
        return found

    costs = phased_costs(schedule, program_of, overlap=overlap)
    return simulate_phased(schedule, costs, p2p=p2p), costs
