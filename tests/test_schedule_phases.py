"""Chunks as phases in the time model (``raymoe.schedule.phases``): alone, every exchange adds to the compute; an
overlapped F&B pair in strict turns costs at least max(compute, communication) and at most their sum, and the
paper's 1:1 compute:communication DualPipe step hides most of it, while 1F1B (no pairs) hides nothing."""

import pytest

from raymoe.schedule import Costs, build_schedule, simulate
from raymoe.schedule.phases import ChunkProgram, phased_costs, run_alone, run_in_turns, uniform_programs


def test_program_shape_is_checked():
    with pytest.raises(ValueError, match="one more compute segment than exchanges"):
        ChunkProgram(compute=(1.0,), a2a=(1.0,))
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        ChunkProgram(compute=(1.0, -1.0), a2a=(1.0,))
    with pytest.raises(ValueError, match="needs at least one exchange"):
        ChunkProgram.uniform(2.0, 1.0, 0)
    assert ChunkProgram.uniform(3.0, 2.0, 2) == ChunkProgram(compute=(1.0, 1.0, 1.0), a2a=(1.0, 1.0))


def test_alone_adds_the_exchanges():
    duration, segments = run_alone(ChunkProgram(compute=(1, 2, 3), a2a=(4, 5)))
    assert duration == 15
    assert [(s.lane, s.start, s.end) for s in segments] == [
        ("compute", 0, 1), ("a2a", 1, 5), ("compute", 5, 7), ("a2a", 7, 12), ("compute", 12, 15)]


def test_turns_follow_the_fixed_order_and_hide_a_one_to_one_exchange():
    f = ChunkProgram(compute=(1, 1, 1), a2a=(1, 1))
    b = ChunkProgram(compute=(1, 1, 1), a2a=(1, 1))
    duration, segments = run_in_turns(f, b)
    compute = [(s.part, s.start) for s in segments if s.lane == "compute"]
    # forward first, then strict alternation; each exchange runs under the other chunk's next phase
    assert compute == [("F", 0), ("B", 1), ("F", 2), ("B", 3), ("F", 4), ("B", 5)]
    assert duration == 6  # compute-bound: all four exchanges hidden


def test_turns_are_bounded_by_max_and_sum():
    for f, b in ((ChunkProgram.uniform(3, 6, 4), ChunkProgram.uniform(6, 1, 4)),
                 (ChunkProgram.uniform(1, 8, 2), ChunkProgram.uniform(2, 8, 2)),
                 (ChunkProgram.uniform(4, 0, 0), ChunkProgram.uniform(4, 4, 4))):
        duration, _ = run_in_turns(f, b)
        compute, comm = f.total_compute + b.total_compute, f.total_a2a + b.total_a2a
        assert max(compute, comm) - 1e-9 <= duration <= compute + comm + 1e-9


def test_a_chunk_whose_partner_is_done_waits_for_its_own_exchange():
    duration, segments = run_in_turns(ChunkProgram(compute=(1, 1), a2a=(5,)), ChunkProgram(compute=(1,)))
    assert duration == 7  # F 0-1, B 1-2, F waits for its exchange until 6, computes 6-7


def test_overlap_shortens_dualpipe_and_leaves_1f1b_alone():
    kwargs = dict(f=1.0, b=2.0, w=1.0, a2a_f=1.0, a2a_b=2.0, exchanges=4)
    step = {}
    for name in ("dualpipe", "1f1b"):
        schedule = build_schedule(name, 4, 16)
        for overlap in (False, True):
            costs = phased_costs(schedule, uniform_programs(**kwargs), overlap=overlap)
            step[name, overlap] = simulate(schedule, Costs(), durations=costs.durations).makespan
    assert step["dualpipe", True] < 0.8 * step["dualpipe", False]  # most of DualPipe's steady state is pairs
    assert step["1f1b", True] == step["1f1b", False]  # no pairs: nothing to hide behind
    assert step["dualpipe", True] < step["1f1b", True]


def test_exposed_time_and_lanes_of_a_pair():
    schedule = build_schedule("dualpipev", 2, 4)
    costs = phased_costs(schedule, uniform_programs(f=1, b=2, w=1, a2a_f=1, a2a_b=2, exchanges=2),
                         overlap=True)
    pair = next(a for a in schedule.compute_actions(0) if a.kind.value == "FB")
    lanes = {s.lane for s in costs.segments[pair]}
    assert lanes == {"compute", "a2a"}
    assert costs.exposed_a2a(pair) == pytest.approx(costs.durations[pair] - 3.0)
    f_alone = [a for a in schedule.compute_actions(0) if a.kind.value == "F"][0]
    assert costs.exposed_a2a(f_alone) == pytest.approx(1.0)  # alone: the whole exchange is exposed


def test_timeline_draws_the_all_to_all_lanes(tmp_path):
    pytest.importorskip("matplotlib")
    from raymoe.schedule.timeline import plot_timeline

    schedule = build_schedule("dualpipev", 2, 4)
    costs = phased_costs(schedule, uniform_programs(f=1, b=2, w=1, a2a_f=1, a2a_b=2, exchanges=2),
                         overlap=True)
    result = simulate(schedule, Costs(), durations=costs.durations)
    path = plot_timeline(schedule, result, tmp_path / "lanes.png", lanes=costs, title="lanes")
    assert path.stat().st_size > 10_000


def test_pairing_1f1b_neighbours_is_checked_and_predicted_slower():
    from raymoe.schedule.action import parse_actions
    from raymoe.schedule.pairing import pair_consecutive, paired_schedule

    assert [str(a) for a in pair_consecutive(parse_actions("1F0,1B0,1F1,1B1,1F2,1B2"))] == [
        "1F0", "1F1&1B0", "1F2&1B1", "1B2"]  # F(m) then B(m) depend on each other: never paired
    for pp, m in ((2, 8), (4, 8)):
        paired, plain = paired_schedule("1f1b", pp, m), build_schedule("1f1b", pp, m)
        kwargs = dict(f=1.0, b=2.0, w=1.0, a2a_f=1.0, a2a_b=2.0, exchanges=4)
        on = simulate(paired, Costs(), durations=phased_costs(paired, uniform_programs(**kwargs),
                                                              overlap=True).durations).makespan
        off = simulate(plain, Costs(), durations=phased_costs(plain, uniform_programs(**kwargs),
                                                              overlap=False).durations).makespan
        assert on > off  # the module docstring's finding: pairing 1F1B costs more than it hides
