"""Text form, CSV files and the Action value."""

import pytest

from raymoe.schedule import (
    Action,
    Kind,
    act,
    build_schedule,
    format_actions,
    overlapped,
    parse_action,
    parse_actions,
    read_csv,
    schedule_from_actions,
    stage_placement,
    write_csv,
)


@pytest.mark.parametrize("text", ["0F3", "12B0", "1I2", "1W2", "0SEND_F3", "1RECV_F3", "1SEND_B3", "0RECV_B3",
                                  "0F5&7B1"])
def test_text_round_trip(text):
    assert str(parse_action(text)) == text


def test_parse_fields():
    assert parse_action("2SEND_B10") == act(Kind.SEND_B, 2, 10)
    fb = parse_action("0F5&7B1")
    assert (fb.kind, fb.stage, fb.microbatch, fb.b_stage, fb.b_microbatch) == (Kind.FB, 0, 5, 7, 1)
    assert fb.parts() == (act("F", 0, 5), act("B", 7, 1))
    assert parse_actions("0F0, 0F1 1B0,") == [act("F", 0, 0), act("F", 0, 1), act("B", 1, 0)]


@pytest.mark.parametrize("text", ["F3", "0X3", "0F", "0F3&", "0B1&7F5", "0F1&1I2", "a0F1", "0SEND3"])
def test_parse_rejects_bad_text(text):
    with pytest.raises(ValueError, match="cannot parse action"):
        parse_action(text)


def test_action_validation():
    with pytest.raises(ValueError, match="b_stage"):
        Action(kind=Kind.FB, stage=0, microbatch=0)
    with pytest.raises(ValueError, match="only FB"):
        Action(kind=Kind.F, stage=0, microbatch=0, b_stage=1, b_microbatch=0)
    with pytest.raises(ValueError, match="stage=-1"):
        act("F", -1, 0)
    assert overlapped(0, 1, 2, 3).is_compute and act("SEND_F", 0, 0).is_comm


def test_csv_round_trip_with_communication(tmp_path):
    schedule = build_schedule("dualpipe", 4, 8)
    path = tmp_path / "dualpipe.csv"
    write_csv(schedule.actions, path)
    loaded = read_csv(path)
    assert {r: tuple(a) for r, a in loaded.items()} == dict(schedule.actions)
    again = schedule_from_actions(loaded, placement=schedule.placement)
    assert dict(again.actions) == dict(schedule.actions)


def test_compute_only_csv_gets_the_same_communication(tmp_path):
    schedule = build_schedule("zb1p", 4, 8)
    path = tmp_path / "zb1p.csv"
    write_csv({r: schedule.compute_actions(r) for r in range(4)}, path)
    again = schedule_from_actions(read_csv(path), placement=stage_placement("zb1p", 4))
    assert dict(again.actions) == dict(schedule.actions)
    assert again.num_microbatches == 8


def test_csv_errors_name_the_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("0F0,0B0\n1F0,oops\n")
    with pytest.raises(ValueError, match=r"row 2 \(rank 1\).*'oops'"):
        read_csv(path)


def test_format_actions():
    assert format_actions([act("F", 0, 0), overlapped(0, 1, 3, 0)]) == "0F0,0F1&3B0"
