"""The closed forms of the DualPipe README's comparison table, and when the simulator matches them exactly.

The README (deepseek-ai/DualPipe, "Pipeline Bubbles and Memory Usage Comparison") states, for PP pipeline
*stages* of equal size (F, B, W, F&B are the costs of one such stage on one micro-batch):

    method      bubble                   parameters per device   activations per device   devices
    1F1B        (PP-1)(F+B)              1x                      PP                       PP
    ZB1P        (PP-1)(F+B-2W)           1x                      PP                       PP
    DualPipe    (PP/2-1)(F&B+B-3W)       2x                      PP+1                     PP
    DualPipeV   (PP/2-1)(F&B+B-3W)       2x                      PP+1                     PP/2

Our ``pp`` is the number of ranks, so for DualPipeV the table's PP is ``2 * pp`` (its bubble is
``(pp-1)(F&B+B-3W)``). GPipe has the bubble of 1F1B and holds all n micro-batches' activations.

The simulated bubble (``SimResult.bubble``: the largest per-rank idle time, zero P2P latency) equals these
formulas exactly under the conditions of ``formula_conditions``; we found them by sweeping costs and they are
checked in tests/test_schedule_table.py. Outside them the formula is only an approximation, in either direction.
"""

from __future__ import annotations

from raymoe.schedule.placement import canonical_name
from raymoe.schedule.simulator import Costs


def readme_bubble(name: str, pp: int, costs: Costs) -> float:
    name = canonical_name(name)
    f, b, w, fb = costs.f, costs.b, costs.w, costs.overlapped
    if name in ("gpipe", "1f1b"):
        return (pp - 1) * (f + b)
    if name == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    stages = 2 * pp if name == "dualpipev" else pp
    return (stages / 2 - 1) * (fb + b - 3 * w)


def readme_activations(name: str, pp: int, num_microbatches: int) -> int:
    """Peak live activations per device, in units of one stage's activations for one micro-batch."""
    name = canonical_name(name)
    if name == "gpipe":
        return num_microbatches
    if name in ("1f1b", "zb1p"):
        return min(pp, num_microbatches)
    stages = 2 * pp if name == "dualpipev" else pp
    return stages + 1


def readme_param_copies(name: str) -> int:
    """Parameters per device in units of one stage's parameters."""
    return 2 if canonical_name(name) in ("dualpipe", "dualpipev") else 1


def formula_conditions(name: str, costs: Costs) -> list[str]:
    """Why ``readme_bubble`` is not exact for these costs (empty when it is)."""
    name = canonical_name(name)
    f, b, w, i, fb = costs.f, costs.b, costs.w, costs.i, costs.overlapped
    unmet = []
    if costs.p2p:
        unmet.append(f"P2P={costs.p2p:g} must be 0 (the formulas ignore communication)")
    if costs.per_chunk:
        unmet.append("no per-chunk costs (the formulas assume stages of equal cost)")
    if name == "zb1p" and w > min(f, i):
        unmet.append(f"W={w:g} must be <= F={f:g} and <= B-W={i:g}, so a deferred W fits the gaps it fills")
    if name in ("dualpipe", "dualpipev"):
        if abs(i - f) > 1e-12:
            unmet.append(f"B-W={i:g} (backward for input) must equal F={f:g}")
        if w > f:
            unmet.append(f"W={w:g} must be <= F={f:g}")
        if not max(f, b) <= fb <= f + b:
            unmet.append(f"FB={fb:g} must lie in [max(F, B), F+B] = [{max(f, b):g}, {f + b:g}]")
    return unmet
