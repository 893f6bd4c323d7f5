"""The checker refuses broken schedules, naming what is wrong; comms.py's lists pass it."""

import pytest

from raymoe.schedule import (
    Kind,
    ScheduleError,
    build_schedule,
    find_deadlock,
    parse_actions,
    schedule_from_actions,
    stage_placement,
)
from raymoe.schedule.comms import needed_receives

P2 = stage_placement("1f1b", 2)

# A correct 1F1B for pp=2, n=2, written out with its communication.
GOOD = {
    0: "0F0,0SEND_F0,0F1,0SEND_F1,0RECV_B0,0B0,0RECV_B1,0B1",
    1: "1RECV_F0,1F0,1B0,1SEND_B0,1RECV_F1,1F1,1B1,1SEND_B1",
}


def _load(lists, placement=P2):
    return schedule_from_actions({r: parse_actions(t) for r, t in lists.items()}, placement=placement)


def test_hand_written_schedule_passes():
    assert _load(GOOD).num_microbatches == 2


def test_missing_w_is_refused():
    zb = build_schedule("zb1p", 2, 3)
    broken = {r: [a for a in zb.actions[r] if not (a.kind is Kind.W and a.stage == 1 and a.microbatch == 2)]
              for r in range(2)}
    with pytest.raises(ScheduleError, match=r"stage 1 \(rank 1\), micro-batch 2: expected one B, or one I and one "
                                            r"W; found B x0, I x1, W x0"):
        schedule_from_actions(broken, placement=zb.placement, num_microbatches=3)


def test_duplicate_forward_is_refused():
    with pytest.raises(ScheduleError, match="micro-batch 0: expected exactly one F, found 2"):
        _load({0: GOOD[0].replace("0F1,", "0F0,0F1,"), 1: GOOD[1]})


def test_receive_then_send_in_both_directions_deadlocks():
    # Rank 0 waits for B0 before it sends F1; rank 1 waits for F1 before it sends B0. Each list is in
    # dependency order and every send pairs with its receive, only the cross-rank order is circular.
    lists = {
        0: "0F0,0SEND_F0,0F1,0RECV_B0,0B0,0SEND_F1,0RECV_B1,0B1",
        1: "1RECV_F0,1F0,1B0,1RECV_F1,1F1,1SEND_B0,1B1,1SEND_B1",
    }
    actions = {r: parse_actions(t) for r, t in lists.items()}
    blocked = find_deadlock(actions, P2)
    assert blocked == ["rank 0 waits in batch [0RECV_B0] for rank 1 to post 1SEND_B0",
                       "rank 1 waits in batch [1RECV_F1] for rank 0 to post 0SEND_F1"]
    with pytest.raises(ScheduleError, match="deadlock: rank 0 waits"):
        schedule_from_actions(actions, placement=P2)


def test_swapped_send_order_is_refused():
    # Rank 0 posts F1 before F0: rank 1's first receive from rank 0 would get the wrong tensor.
    lists = {0: "0F0,0F1,0SEND_F1,0SEND_F0,0RECV_B0,0B0,0RECV_B1,0B1", 1: GOOD[1]}
    with pytest.raises(ScheduleError, match=r"rank 0's send #0 to rank 1 is 0SEND_F1, rank 1's receive #0 from "
                                            r"rank 0 is 1RECV_F0"):
        _load(lists)


def test_receive_after_its_consumer_is_refused():
    lists = {0: GOOD[0], 1: "1F0,1RECV_F0,1B0,1SEND_B0,1RECV_F1,1F1,1B1,1SEND_B1"}
    with pytest.raises(ScheduleError, match=r"rank 1, action #0 1F0: needs 1RECV_F0 earlier on rank 1"):
        _load(lists)


def test_send_before_compute_is_refused():
    lists = {0: "0SEND_F0,0F0,0F1,0SEND_F1,0RECV_B0,0B0,0RECV_B1,0B1", 1: GOOD[1]}
    with pytest.raises(ScheduleError, match=r"0SEND_F0: needs 0F0 earlier"):
        _load(lists)


def test_w_before_i_is_refused():
    lists = {0: "0F0,0W0,0I0", 1: ""}
    with pytest.raises(ScheduleError, match=r"0W0: needs 0I0 earlier"):
        schedule_from_actions({0: parse_actions(lists[0])}, placement=stage_placement("1f1b", 1))


def test_action_on_the_wrong_rank_is_refused():
    lists = {0: GOOD[0].replace("0F1", "1F1"), 1: GOOD[1]}
    with pytest.raises(ScheduleError, match=r"rank 0: 1F1 names stage 1, which lives on rank 1"):
        _load(lists)


def test_foreign_microbatch_of_a_dualpipe_copy_is_refused():
    schedule = build_schedule("dualpipe", 2, 4)
    actions = {r: list(schedule.actions[r]) for r in range(2)}
    actions[0][0] = parse_actions("0F2")[0]  # copy 0 carries micro-batches 0 and 1 only
    with pytest.raises(ScheduleError, match="stage 0 carries micro-batches 0..1"):
        schedule_from_actions(actions, placement=schedule.placement)


def test_generated_lists_receive_just_before_use_and_pair_with_sends():
    schedule = build_schedule("dualpipe", 8, 16)
    for r in range(8):
        acts = schedule.actions[r]
        for i, a in enumerate(acts):
            if a.is_compute:
                # every receive this compute needs sits in the batch right before it, or earlier (prefetched)
                before = set(acts[:i])
                assert set(needed_receives(a, r, schedule.placement)) <= before
            elif a.is_comm:
                assert schedule.peer(a) != r
