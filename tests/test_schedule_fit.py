"""Fitting the simulator's costs to measured timings (raymoe.bench.schedule_fit), on timings made by the simulator.

A simulated run is a measurement with known costs: turned into the workers' ``StepResult`` timings, the fit must
recover those costs (per kind and chunk) and the P2P latency exactly, and predict and replay its makespan.
"""

from types import SimpleNamespace

import pytest

from raymoe.bench import schedule_fit as fit
from raymoe.parallel.executor import ActionTiming
from raymoe.schedule import SCHEDULE_NAMES, Costs, build_schedule, simulate

TRUTH = Costs.parse("F=1.0,B=2.2,W=0.8,FB=3.1,P2P=0.25,F@3=1.6,B@3=3.0,I@3=1.9,W@3=1.1,FB@3=4.4,F@0=0.7")


def measured(schedule, costs, *, origin=100.0, late=None):
    """The simulated run as workers report it: per rank its timings, on a clock starting at its origin.

    ``late = (rank, delay)`` starts that rank's clock ``delay`` later (start skew); absolute times are unchanged."""
    result = simulate(schedule, costs)
    out = []
    for r in range(schedule.pp):
        delay = late[1] if late and late[0] == r else 0.0
        timings = tuple(ActionTiming(kind=e.action.kind.value, stage=e.action.stage, microbatch=e.action.microbatch,
                                     start_s=e.start - delay, end_s=e.end - delay)
                        for e in result.events if e.rank == r)
        out.append(SimpleNamespace(pp_rank=r, timings=timings, timings_origin_s=origin + delay))
    return result, out


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_the_fit_recovers_the_costs_that_made_the_timings(name):
    schedule = build_schedule(name, 4, 8)
    truth, results = measured(schedule, TRUTH)
    timelines = [fit.step_timeline(schedule, results)] * 2
    costs = fit.per_chunk_costs(timelines)
    assert costs.p2p == pytest.approx(TRUTH.p2p)
    for e in truth.events:
        chunk = schedule.placement.info(e.action.stage).chunk
        assert costs.of(e.action, chunk) == pytest.approx(e.end - e.start), e.action
    assert timelines[0].makespan == pytest.approx(truth.makespan)
    assert simulate(schedule, costs).makespan == pytest.approx(truth.makespan)
    assert fit.replay(timelines[0], costs) == pytest.approx(truth.makespan)


def test_per_kind_costs_average_over_chunks_and_ignore_latency():
    schedule = build_schedule("1f1b", 2, 4)
    _, results = measured(schedule, Costs.parse("F=1,B=2,P2P=0.5,F@1=3"))
    costs = fit.per_kind_costs([fit.step_timeline(schedule, results)])
    assert (costs.f, costs.b, costs.p2p, costs.per_chunk) == (pytest.approx(2.0), pytest.approx(2.0), 0.0, {})


def test_zero_bubble_backward_is_input_plus_weight_half():
    schedule = build_schedule("zb1p", 4, 8)
    _, results = measured(schedule, Costs.parse("F=1,B=2.5,W=0.9"))
    costs = fit.per_kind_costs([fit.step_timeline(schedule, results)])
    assert (costs.b, costs.w, costs.i) == (pytest.approx(2.5), pytest.approx(0.9), pytest.approx(1.6))


def test_start_skew_is_measured_and_changes_no_cost():
    schedule = build_schedule("1f1b", 4, 8)
    truth, results = measured(schedule, TRUTH, late=(3, 0.1))  # rank 3 starts 0.1 late, before its first input
    timeline = fit.step_timeline(schedule, results)
    assert timeline.skew == pytest.approx(0.1)
    assert timeline.makespan == pytest.approx(truth.makespan)
    assert fit.p2p_latency([timeline]) == pytest.approx(TRUTH.p2p)


def test_timings_that_do_not_match_the_schedule_are_refused():
    schedule = build_schedule("1f1b", 2, 4)
    _, results = measured(schedule, TRUTH)
    results[1] = SimpleNamespace(pp_rank=1, timings=results[1].timings[1:], timings_origin_s=100.0)
    with pytest.raises(ValueError, match="rank 1 timed 7 actions"):
        fit.step_timeline(schedule, results)


def test_no_transfer_no_latency():
    schedule = build_schedule("1f1b", 1, 2)
    _, results = measured(schedule, TRUTH)
    assert fit.p2p_latency([fit.step_timeline(schedule, results)]) is None
