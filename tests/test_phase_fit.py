"""Measured phases (``raymoe.bench.phase_fit``) on a step made by the phase model: cut at the exchanges, every
action's program comes back, the replay is the simulated makespan, and the per-chunk means predict it."""

from types import SimpleNamespace

import pytest

from raymoe.bench import phase_fit
from raymoe.parallel.executor import ActionTiming
from raymoe.parallel.interleave import ExchangeTiming, PhaseTiming
from raymoe.schedule import Costs, Kind, build_schedule, simulate
from raymoe.schedule.phases import ChunkProgram, phased_costs, uniform_programs

KWARGS = dict(f=1.0, b=2.0, w=0.5, a2a_f=0.8, a2a_b=1.2, exchanges=4)


def measured(schedule, *, overlap):
    """The simulated step as workers report it: timings, exchanges and (overlap) the pairs' turns."""
    costs = phased_costs(schedule, uniform_programs(**KWARGS), overlap=overlap)
    result = simulate(schedule, Costs(), durations=costs.durations)
    out = []
    for r in range(schedule.pp):
        timings, exchanges, phases = [], [], []
        for e in (e for e in result.events if e.rank == r):
            a = e.action
            f_end = None
            if a.kind is Kind.FB and not overlap:
                f_end = e.start + max(s.end for s in costs.segments[a] if s.part == "F")
            timings.append(ActionTiming(kind=a.kind.value, stage=a.stage, microbatch=a.microbatch, start_s=e.start,
                                        end_s=e.end, forward_end_s=f_end))
            index = {"F": 0, "B": 0}
            for seg in costs.segments[a]:
                part = seg.part if a.kind is Kind.FB else ("F" if a.kind is Kind.F else "B")
                if seg.lane == "a2a":
                    exchanges.append(ExchangeTiming(part=part, issued_s=e.start + seg.start,
                                                    wait_s=e.start + seg.start, done_s=e.start + seg.end))
                elif a.kind is Kind.FB and overlap:
                    phases.append(PhaseTiming(pair=str(a), part=seg.part, index=index[seg.part],
                                              start_s=e.start + seg.start, end_s=e.start + seg.end,
                                              ends_in_exchange=False))
                    index[seg.part] += 1
        out.append(SimpleNamespace(pp_rank=r, timings=tuple(timings), exchanges=tuple(exchanges),
                                   phases=tuple(phases)))
    return result, out


@pytest.mark.parametrize("name", ["dualpipev", "dualpipe", "1f1b"])
@pytest.mark.parametrize("overlap", [False, True])
def test_programs_replay_and_prediction_come_back(name, overlap):
    schedule = build_schedule(name, 2, 4 if name != "dualpipe" else 4)
    truth, results = measured(schedule, overlap=overlap)
    f = ChunkProgram.uniform(KWARGS["f"], KWARGS["a2a_f"], KWARGS["exchanges"])
    alone, pairs = phase_fit.measured_programs(schedule, results[0])
    for action, program in alone.items():
        if action.kind is Kind.F:
            assert program.compute == pytest.approx(f.compute) and program.a2a == pytest.approx(f.a2a)
    if overlap:
        for f_prog, b_prog in pairs.values():
            assert f_prog.a2a == pytest.approx(f.a2a) and len(b_prog.compute) == KWARGS["exchanges"] + 1
    assert phase_fit.replay_phases(schedule, results, overlap=overlap) == pytest.approx(truth.makespan)
    means = phase_fit.mean_programs(schedule, [results])
    step, _ = phase_fit.predicted(schedule, means, overlap=overlap)
    assert step.makespan == pytest.approx(truth.makespan)


def test_at_ratio_rescales_communication_only():
    programs = {("F", 0): ChunkProgram(compute=(1.0, 3.0), a2a=(2.0,)), ("W", 0): ChunkProgram(compute=(1.0,))}
    scaled = phase_fit.at_ratio(programs, 1.0)
    assert scaled["F", 0] == ChunkProgram(compute=(1.0, 3.0), a2a=(4.0,))
    assert scaled["W", 0] == programs["W", 0]
