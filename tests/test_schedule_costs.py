"""The simulator's cost model: per-chunk costs, P2P latency from both ends posted, replaying given durations."""

import pytest

from raymoe.schedule import Costs, Kind, act, build_schedule, overlapped, simulate
from raymoe.schedule.formulas import formula_conditions


def test_a_transfer_starts_when_both_ends_are_posted():
    # gpipe pp=2, 2 micro-batches: rank 1 posts 1RECV_F1 only after 1F0 ends (2.5), although rank 0 posted
    # 0SEND_F1 at 2.0, so 1F1 starts at 2.5 + P2P; likewise 0RECV_B1 is posted after 0B0 ends.
    result = simulate(build_schedule("gpipe", 2, 2), Costs.parse("F=1,B=2,P2P=0.5"))
    starts = {str(e.action): e.start for e in result.events}
    assert starts == {"0F0": 0.0, "0F1": 1.0, "1F0": 1.5, "1F1": 3.0, "1B0": 4.0, "1B1": 6.0, "0B0": 6.5,
                      "0B1": 9.0}
    assert result.makespan == 11.0


def test_zero_latency_is_pure_data_flow():
    # With P2P = 0 a receive posted late changes nothing: the compute that consumes it starts no earlier anyway.
    result = simulate(build_schedule("gpipe", 2, 2), Costs.parse("F=1,B=2"))
    assert result.makespan == 2 * 1 + 2 * 2 + 1 + 2  # fill, rank 1's work, drain


def test_per_chunk_cost_overrides_its_kind_on_that_chunk_only():
    # One micro-batch through 2 ranks: F0, F1 (heavier last chunk), B1, B0 in a row.
    result = simulate(build_schedule("gpipe", 2, 1), Costs.parse("F=1,B=2,F@1=3"))
    assert {str(e.action): e.end - e.start for e in result.events} == {"0F0": 1, "1F0": 3, "1B0": 2, "0B0": 2}
    assert result.makespan == 8


def test_dualpipe_copies_share_their_chunk_costs_and_fb_counts_under_its_forward_chunk():
    schedule = build_schedule("dualpipe", 4, 8)
    costs = Costs.parse("F=1,B=2,W=1,FB=3,F@3=1.5,B@3=2.5,FB@0=3.1,FB@1=3.2,FB@2=3.3,FB@3=3.4")
    placement = schedule.placement
    result = simulate(schedule, costs)
    seen_fb = set()
    for e in result.events:
        chunk = placement.info(e.action.stage).chunk
        duration = e.end - e.start
        if e.action.kind is Kind.FB:
            seen_fb.add(chunk)
            assert duration == pytest.approx(3.1 + 0.1 * chunk), e
        elif e.action.kind in (Kind.F, Kind.B):
            last = chunk == placement.num_chunks - 1
            base = {Kind.F: (1, 1.5), Kind.B: (2, 2.5)}[e.action.kind]
            assert duration == pytest.approx(base[last]), e
    assert seen_fb == {0, 1, 2, 3}
    # both copies of the last chunk (stages 3 and 7, on ranks 3 and 0) take the per-chunk cost
    assert {e.action.stage for e in result.events
            if e.action.kind is Kind.F and e.end - e.start == pytest.approx(1.5)} == {3, 7}


def test_per_chunk_i_has_its_own_entry_and_falls_back_to_b_minus_w():
    costs = Costs.parse("F=1,B=3,W=1,I@2=0.5")
    assert costs.of(act("I", 2, 0), chunk=2) == 0.5
    assert costs.of(act("I", 1, 0), chunk=1) == 2
    assert costs.of(act("I", 2, 0)) == 2  # no chunk given: the per-kind cost
    assert costs.of(act("B", 2, 0), chunk=2) == 3  # B has no entry on chunk 2
    assert costs.of(overlapped(2, 1, 5, 0), chunk=2) == 4  # FB neither: F + B


def test_parse_and_str_round_trip_per_chunk_entries():
    costs = Costs.parse("f=1, B=2, W=1, FB@0=2.5, F@3=1.5, i@1=0.7, P2P=0.1")
    assert costs.per_chunk == {("FB", 0): 2.5, ("I", 1): 0.7, ("F", 3): 1.5}
    assert str(costs) == "F=1,B=2,W=1,FB=3,P2P=0.1,FB@0=2.5,I@1=0.7,F@3=1.5"
    again = Costs.parse(str(costs))  # FB prints as its value, F + B here
    assert (str(again), again.per_chunk, again.overlapped) == (str(costs), costs.per_chunk, costs.overlapped)


@pytest.mark.parametrize("text", ["F@x=1", "P2P@1=1", "Q@1=1", "F@-1=1", "F@1"])
def test_parse_refuses_bad_per_chunk_items(text):
    with pytest.raises(ValueError, match="KIND@CHUNK=VALUE"):
        Costs.parse(text)


@pytest.mark.parametrize(("per_chunk", "match"), [
    ({("F", 0): -1.0}, "must be >= 0"),
    ({("F", -1): 1.0}, "chunk an int >= 0"),
    ({("P2P", 0): 1.0}, "kind one of"),
    ({"F": 1.0}, "expected \\(kind, chunk\\)"),
])
def test_costs_refuse_bad_per_chunk_entries(per_chunk, match):
    with pytest.raises(ValueError, match=match):
        Costs(per_chunk=per_chunk)


def test_the_readme_formulas_do_not_claim_per_chunk_costs():
    assert formula_conditions("1f1b", Costs.parse("F=1,B=2,W=1")) == []
    assert any("per-chunk" in u for u in formula_conditions("1f1b", Costs.parse("F=1,B=2,W=1,F@3=2")))


def test_durations_replay_another_cost_model():
    schedule = build_schedule("dualpipev", 2, 8)
    truth = simulate(schedule, Costs.parse("F=1.2,B=2.1,W=0.7,FB=3.0,P2P=0.2,F@3=1.9,I@0=1.1"))
    durations = {e.action: e.end - e.start for e in truth.events}
    replayed = simulate(schedule, Costs.parse("P2P=0.2"), durations=durations)
    assert replayed.makespan == pytest.approx(truth.makespan)
    assert [(e.action, e.start) for e in replayed.events] == [(e.action, e.start) for e in truth.events]
