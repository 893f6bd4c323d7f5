"""The all-to-all in the time model: sequential pairs pay compute plus communication, overlapped pairs the larger
of the two; the paper's 1:1 compute:communication DualPipe step then equals the compute-only step's pairs."""

import pytest

from raymoe.schedule import build_schedule, simulate
from raymoe.schedule.a2a_costs import a2a_costs


def test_pair_costs():
    off = a2a_costs(f=1, b=2, w=1, a2a_f=1, a2a_b=2, overlap=False)
    on = a2a_costs(f=1, b=2, w=1, a2a_f=1, a2a_b=2, overlap=True)
    assert (off.f, off.b, off.overlapped) == (2, 4, 6)
    assert (on.f, on.b, on.overlapped) == (2, 4, 3)  # 1:1: the exchange hides completely behind the other chunk
    assert a2a_costs(f=1, b=2, w=1, a2a_f=3, a2a_b=3, overlap=True).overlapped == 6  # communication-bound
    with pytest.raises(ValueError, match="a2a_f must be >= 0"):
        a2a_costs(f=1, b=2, w=1, a2a_f=-1, a2a_b=0, overlap=True)


def test_overlap_shortens_dualpipe_and_leaves_1f1b_alone():
    dual, one = build_schedule("dualpipe", 4, 16), build_schedule("1f1b", 4, 16)
    kwargs = dict(f=1.0, b=2.0, w=1.0, a2a_f=1.0, a2a_b=2.0)
    dual_off = simulate(dual, a2a_costs(overlap=False, **kwargs)).makespan
    dual_on = simulate(dual, a2a_costs(overlap=True, **kwargs)).makespan
    one_off = simulate(one, a2a_costs(overlap=False, **kwargs)).makespan
    one_on = simulate(one, a2a_costs(overlap=True, **kwargs)).makespan
    assert dual_on < 0.75 * dual_off  # most of DualPipe's steady state is F&B pairs
    assert one_on == one_off  # no pairs: nothing to hide behind
    assert dual_on < one_on
