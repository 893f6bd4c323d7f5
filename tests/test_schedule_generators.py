"""Generators: golden action strings, DualPipe's per-step counts, placements, degenerate and invalid shapes."""

import pytest

from raymoe.schedule import (
    SCHEDULE_NAMES,
    Kind,
    build_schedule,
    canonical_name,
    format_actions,
    stage_placement,
)

# Compute order only (SEND/RECV come from comms.py). Checked by hand against deepseek-ai/DualPipe's step():
# e.g. rank 0 of DualPipe, pp=4: nF0 = 2, nF0F1 = 1, nB1W1F1 = 1, nF0B1F1B0 = 1, nB1F1B0 = 1, nB1B0 = 1 (its B0
# half zero-bubble), nWB0 = 1, nW = 1. Copy 1 (stages 4..7) carries micro-batches 4..7.
GOLDEN = {
    ("dualpipe", 4, 8): [
        "0F0,0F1,0F2,7F4,7I4,7W4,7F5,0F3&7B5,7F6&0B0,7B6,7F7&0B1,7B7,0I2,0W2,0I3,0W3",
        "1F0,6F4,1F1,6F5,1F2,6B4,6F6&1B0,1F3&6B5,6F7&1B1,6B6,1B2,6I7,1I3,6W7,1W3",
        "5F4,2F0,5F5,2F1,5F6,2B0,2F2&5B4,5F7&2B1,2F3&5B5,2B2,5B6,2I3,5I7,2W3,5W7",
        "4F4,4F5,4F6,3F0,3I0,3W0,3F1,4F7&3B1,3F2&4B4,3B2,3F3&4B5,3B3,4I6,4W6,4I7,4W7",
    ],
    ("dualpipev", 4, 8): [
        "0F0,0F1,0F2,0F3,0F4,0F5,0F6,7F0,7I0,7W0,7F1,7I1,7W1,7F2,7I2,7W2,7F3,0F7&7B3,7F4&0B0,7B4,7F5&0B1,7B5,"
        "7F6&0B2,7B6,7F7&0B3,7B7,0I4,0W4,0I5,0W5,0I6,0W6,0I7,0W7",
        "1F0,1F1,1F2,1F3,1F4,6F0,1F5,6F1,6I0,6W0,6F2,6I1,6W1,6F3,1F6&6B2,6F4&1B0,1F7&6B3,6F5&1B1,6B4,6F6&1B2,"
        "6B5,6F7&1B3,6B6,1B4,6I7,1I5,6W7,1I6,1W5,1I7,1W6,1W7",
        "2F0,2F1,2F2,5F0,2F3,5F1,2F4,5F2,5I0,5W0,5F3,2F5&5B1,5F4&2B0,2F6&5B2,5F5&2B1,2F7&5B3,5F6&2B2,5B4,"
        "5F7&2B3,5B5,2B4,5B6,2I5,5I7,2I6,2W5,2I7,5W7,2W6,2W7",
        "3F0,4F0,3F1,4F1,3F2,4F2,3F3,4F3,3F4,4B0,4F4&3B0,3F5&4B1,4F5&3B1,3F6&4B2,4F6&3B2,3F7&4B3,4F7&3B3,4B4,"
        "3B4,4B5,3B5,4I6,3I6,4I7,3I7,4W6,3W6,4W7,3W7",
    ],
    ("1f1b", 4, 6): [
        "0F0,0F1,0F2,0F3,0B0,0F4,0B1,0F5,0B2,0B3,0B4,0B5",
        "1F0,1F1,1F2,1B0,1F3,1B1,1F4,1B2,1F5,1B3,1B4,1B5",
        "2F0,2F1,2B0,2F2,2B1,2F3,2B2,2F4,2B3,2F5,2B4,2B5",
        "3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3,3F4,3B4,3F5,3B5",
    ],
    ("zb1p", 3, 4): [
        "0F0,0F1,0F2,0I0,0W0,0F3,0I1,0W1,0I2,0W2,0I3,0W3",
        "1F0,1F1,1I0,1F2,1I1,1W0,1F3,1I2,1W1,1I3,1W2,1W3",
        "2F0,2I0,2F1,2I1,2F2,2I2,2W0,2F3,2I3,2W1,2W2,2W3",
    ],
    ("gpipe", 2, 3): ["0F0,0F1,0F2,0B0,0B1,0B2", "1F0,1F1,1F2,1B0,1B1,1B2"],
}


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_compute_order(key):
    schedule = build_schedule(*key)
    assert [format_actions(schedule.compute_actions(r)) for r in range(schedule.pp)] == GOLDEN[key]


def _reference_steps(h: int, hr: int, n_per_copy: int) -> dict[str, int]:
    """The step counts of deepseek-ai/DualPipe step() (DualPipeV: h = ranks, hr = rank, n_per_copy = chunks)."""
    return {"nF0": 2 * (h - hr - 1), "nF0F1": hr + 1, "nB1W1F1": h - hr - 1,
            "nF0B1F1B0": n_per_copy - 2 * h + hr + 1, "nB1F1B0": h - hr - 1, "nB1B0": hr + 1,
            "nWB0": h - hr - 1, "nW": hr + 1}


@pytest.mark.parametrize(("name", "pp", "n"), [("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipe", 8, 20),
                                              ("dualpipe", 6, 14), ("dualpipev", 1, 3), ("dualpipev", 4, 8),
                                              ("dualpipev", 4, 10), ("dualpipev", 5, 13)])
def test_dualpipe_action_counts_follow_the_reference_steps(name, pp, n):
    schedule = build_schedule(name, pp, n)
    for r in range(pp):
        if name == "dualpipe":
            h, hr, n_c = pp // 2, min(r, pp - 1 - r), n // 2
        else:
            h, hr, n_c = pp, r, n
        s = _reference_steps(h, hr, n_c)
        middle = hr == h - 1  # its first main-step pair is not overlapped
        kinds = [a.kind for a in schedule.compute_actions(r)]
        assert kinds.count(Kind.FB) == 2 * s["nF0B1F1B0"] - middle + s["nB1F1B0"]
        assert kinds.count(Kind.F) == s["nF0"] + 2 * s["nF0F1"] + s["nB1W1F1"] + middle
        assert kinds.count(Kind.I) == s["nB1W1F1"] + s["nWB0"] + s["nW"]  # zero-bubble backwards
        assert kinds.count(Kind.W) == s["nB1W1F1"] + s["nWB0"] + s["nW"]
        assert kinds.count(Kind.B) == middle + s["nB1F1B0"] + 2 * s["nB1B0"] - s["nW"]
        # Leading forwards: steps 1 and 2, then, on a middle rank (no step 3), step 4's un-overlapped F0.
        leading = next(i for i, k in enumerate(kinds) if k is not Kind.F)
        assert leading == s["nF0"] + 2 * s["nF0F1"] + middle


def test_dualpipe_placement():
    p = stage_placement("dualpipe", 4)
    assert p.rank_stages() == {0: (0, 7), 1: (1, 6), 2: (2, 5), 3: (3, 4)}
    assert [(s.copy, s.chunk, s.direction) for s in p.stages[3:5]] == [(0, 3, 0), (1, 0, 1)]
    assert p.info(3).is_last and p.info(4).is_first and p.info(4).next_stage == 5
    assert list(p.microbatches_of(5, 8)) == [4, 5, 6, 7]
    assert p.param_units_per_rank == 2 and p.num_chunks == 4


def test_dualpipev_placement():
    p = stage_placement("dualpipe_v", 4)
    assert p.rank_stages() == {0: (0, 7), 1: (1, 6), 2: (2, 5), 3: (3, 4)}
    assert p.info(3).next_stage == 4 and p.rank_of(4) == 3  # the V's turn stays on rank 3
    assert p.num_copies == 1 and p.num_chunks == 8 and p.info(7).is_last
    assert list(p.microbatches_of(7, 8)) == list(range(8))


def test_one_stage_per_rank_placement():
    p = stage_placement("one_f_one_b", 3)
    assert p.rank_stages() == {0: (0,), 1: (1,), 2: (2,)}
    assert p.info(0).is_first and p.info(2).is_last and p.info(1).prev_stage == 0


def test_every_schedule_builds_and_checks_over_a_grid():
    for name in SCHEDULE_NAMES:
        for pp in (1, 2, 3, 4, 6):
            for n in (1, 2, 5, 2 * pp, 2 * pp + 3, 3 * pp + 1):
                try:
                    schedule = build_schedule(name, pp, n)  # raises ScheduleError if it does not check
                except ValueError as exc:
                    assert name in ("dualpipe", "dualpipev"), exc
                    continue
                assert schedule.num_microbatches == n


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb1p", "dualpipev"])
def test_pp1_degenerates_to_one_rank_without_communication(name):
    schedule = build_schedule(name, 1, 4)
    actions = schedule.actions[0]
    assert all(a.is_compute for a in actions)
    assert {(p.stage, p.microbatch) for a in actions for p in a.parts() if p.kind is Kind.F} == {
        (s, m) for s in range(schedule.num_stages) for m in range(4)}
    if name == "1f1b":
        assert format_actions(actions) == "0F0,0B0,0F1,0B1,0F2,0B2,0F3,0B3"


@pytest.mark.parametrize(("name", "pp", "n", "message"), [
    ("dualpipe", 3, 6, "even pp.*pp=3"),
    ("dualpipe", 1, 2, "even pp.*pp=1"),
    ("dualpipe", 4, 6, "num_microbatches >= 2\\*pp = 8.*num_microbatches=6"),
    ("dualpipe", 4, 9, "even num_microbatches.*num_microbatches=9"),
    ("dualpipev", 4, 7, "num_microbatches >= 2\\*pp = 8.*num_microbatches=7"),
    ("1f1b", 0, 4, "pp must be >= 1.*pp=0"),
    ("gpipe", 2, 0, "num_microbatches must be >= 1, got 0"),
    ("pipedream", 2, 4, "unknown schedule 'pipedream'"),
])
def test_invalid_inputs_name_the_values(name, pp, n, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(name, pp, n)


def test_aliases():
    assert canonical_name("one_f_one_b") == "1f1b" and canonical_name("DualPipe_V") == "dualpipev"
    assert build_schedule("dualpipe_v", 2, 4).name == "dualpipev"
