"""``Interleaver``: an F&B pair's two chunks take strict turns at their exchanges, forward first, whatever the
threads' timing; a chunk left alone runs on; a failure in either chunk is raised, and nothing hangs."""

import time

import pytest

from raymoe.parallel.interleave import Interleaver


def _chunk(interleaver, part, log, exchanges, sleeps):
    def body():
        for k in range(exchanges + 1):
            time.sleep(sleeps[k % len(sleeps)])  # compute of phase k
            log.append(f"{part}{k}")
            if k < exchanges:
                interleaver.in_flight(part, lambda: None)
    return body


@pytest.mark.parametrize("f_sleep,b_sleep", [(0.0, 0.02), (0.02, 0.0)])
def test_turns_are_strict_and_forward_first_whatever_the_timing(f_sleep, b_sleep):
    interleaver, log = Interleaver(), []
    interleaver.run_pair(_chunk(interleaver, "F", log, 2, [f_sleep]), _chunk(interleaver, "B", log, 3, [b_sleep]),
                         label="0F1&1B0")
    assert log == ["F0", "B0", "F1", "B1", "F2", "B2", "B3"]
    phases = interleaver.take()
    assert [(p.part, p.index, p.ends_in_exchange) for p in phases] == [
        ("F", 0, True), ("B", 0, True), ("F", 1, True), ("B", 1, True), ("F", 2, False), ("B", 2, True),
        ("B", 3, False)]
    assert all(p.pair == "0F1&1B0" and p.end_s >= p.start_s for p in phases)
    assert all(a.end_s <= b.start_s + 1e-6 for a, b in zip(phases, phases[1:]))  # one chunk computes at a time
    assert interleaver.take() == [] and not interleaver.active


def test_outside_a_pair_nothing_takes_turns():
    assert not Interleaver().active


@pytest.mark.parametrize("failing", ["F", "B"])
def test_a_failing_chunk_is_raised_and_the_other_finishes(failing):
    interleaver, log = Interleaver(), []

    def broken():
        raise RuntimeError(f"{failing} broke")

    good = _chunk(interleaver, "B" if failing == "F" else "F", log, 2, [0.0])
    bodies = (broken, good) if failing == "F" else (good, broken)
    with pytest.raises(RuntimeError, match=f"{failing} broke"):
        interleaver.run_pair(*bodies)
    assert len(log) == 3 and not interleaver.active


def test_pairs_do_not_nest():
    interleaver = Interleaver()
    with pytest.raises(RuntimeError, match="do not nest"):
        interleaver.run_pair(lambda: interleaver.run_pair(lambda: None, lambda: None), lambda: None)
