"""The simulator reproduces the DualPipe README's comparison table (bubble, activations, parameters).

The formulas hold exactly under ``formula_conditions`` (zero P2P; ZB1P: W <= F and W <= B-W; DualPipe and
DualPipeV: B-W = F, W <= F and max(F, B) <= F&B <= F+B), and we check them there, for two cost points, PP in
{4, 8, 16} and micro-batches 2*PP and 3*PP. Outside the conditions the simulator must disagree with the
formula: it is timing the lists, not evaluating the formula.
"""

import pytest

from raymoe.schedule import Costs, build_schedule, simulate
from raymoe.schedule.formulas import (
    formula_conditions,
    readme_activations,
    readme_bubble,
    readme_param_copies,
)

COSTS = [Costs.parse("F=1,B=2,W=1,FB=3"), Costs.parse("F=2,B=3,W=1,FB=4")]
# DualPipeV also at pp=2: the table counts stages, and DualPipeV puts PP stages on PP/2 ranks.
CASES = [(name, pp, n) for name in ("1f1b", "zb1p", "dualpipe", "dualpipev")
         for pp in ((2, 4, 8, 16) if name == "dualpipev" else (4, 8, 16)) for n in (2 * pp, 3 * pp)]


@pytest.mark.parametrize(("name", "pp", "n"), CASES)
def test_readme_table(name, pp, n):
    schedule = build_schedule(name, pp, n)
    for i, costs in enumerate(COSTS):
        assert formula_conditions(name, costs) == []
        result = simulate(schedule, costs, check=False)  # build_schedule checked it
        assert result.bubble == pytest.approx(readme_bubble(name, pp, costs)), costs
        assert result.peak_activations == readme_activations(name, pp, n)
        assert result.param_copies == readme_param_copies(name)
        if i == 0:  # with F&B = F+B every rank is equally busy, so every rank idles the same
            assert result.mean_bubble == pytest.approx(result.bubble)


def test_readme_numbers_at_pp8():
    # The README's example costs (one cell per F, W, I; two per B; three per F&B), written out.
    costs = COSTS[0]
    got = {name: simulate(build_schedule(name, 8, 20), costs) for name in ("1f1b", "zb1p", "dualpipe")}
    assert {k: r.bubble for k, r in got.items()} == {"1f1b": 21, "zb1p": 7, "dualpipe": 6}
    assert {k: r.peak_activations for k, r in got.items()} == {"1f1b": 8, "zb1p": 8, "dualpipe": 9}
    assert {k: r.param_copies for k, r in got.items()} == {"1f1b": 1, "zb1p": 1, "dualpipe": 2}
    v = simulate(build_schedule("dualpipev", 4, 20), costs)  # 8 stages on 4 ranks
    assert (v.bubble, v.peak_activations, v.param_copies, v.model_fraction_per_rank) == (6, 9, 2, 0.25)


@pytest.mark.parametrize(("name", "costs"), [
    ("dualpipe", "F=1,B=3,W=1,FB=4"),     # B-W = 2 != F
    ("dualpipev", "F=1,B=2,W=1,FB=1.5"),  # F&B below max(F, B)
    ("zb1p", "F=1,B=4,W=2"),              # W > F
    ("1f1b", "F=1,B=2,W=1,P2P=0.5"),      # communication is not free
])
def test_formula_is_not_exact_outside_its_conditions(name, costs):
    costs = Costs.parse(costs)
    assert formula_conditions(name, costs)
    result = simulate(build_schedule(name, 4, 12), costs, check=False)
    assert result.bubble != pytest.approx(readme_bubble(name, 4, costs))


def test_latency_is_charged_per_hop():
    # One micro-batch through 4 ranks and back: 4 F, 4 B and 6 transfers in a row.
    result = simulate(build_schedule("gpipe", 4, 1), Costs.parse("F=1,B=2,P2P=0.5"), check=False)
    assert result.makespan == pytest.approx(4 * 1 + 4 * 2 + 6 * 0.5)


def test_blocking_sends_never_beat_lazy_sends():
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        result = simulate(build_schedule(name, 4, 8), COSTS[0], check=False)
        assert result.makespan_blocking_sends >= result.makespan
