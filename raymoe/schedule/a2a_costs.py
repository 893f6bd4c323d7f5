"""Expert all-to-all in the schedule's time model: what DualPipe's F&B overlap hides, predicted.

``Costs`` prices each action as one block of rank time. With expert parallelism a chunk's forward also waits for
its dispatch and combine all-to-alls (``a2a_f``), its backward for their mirror images (``a2a_b``). Sequentially
those add to the compute: F = f + a2a_f, B = b + a2a_b, an F&B pair their sum. With overlap and communication on
its own engine (GPU copy engines, or DeepEP's 20 SMs in the paper), the pair's two chunks take turns: each one's
all-to-all is in flight while the other computes, and the pair costs max(f + b, a2a_f + a2a_b) -- compute-bound
when compute is at least the communication (the paper's 1:1 case is exactly hidden), communication-bound
otherwise. F and B outside pairs (warm-up, cool-down, 1F1B's steady state) still pay their all-to-all.

``a2a_costs`` turns per-chunk compute costs and all-to-all costs into the ``Costs`` the simulator takes, so the
same action lists give the step with and without overlap (``raymoe.bench.a2a_overlap`` prints both beside what
this machine measured).
"""

from __future__ import annotations

from raymoe.schedule.simulator import Costs


def a2a_costs(*, f: float, b: float, w: float, a2a_f: float, a2a_b: float, overlap: bool, p2p: float = 0.0) -> Costs:
    """Costs of a chunk whose forward computes ``f`` and exchanges ``a2a_f``, whose backward computes ``b``
    (``w`` of it the weight half, no all-to-all) and exchanges ``a2a_b``."""
    for name, value in (("a2a_f", a2a_f), ("a2a_b", a2a_b)):
        if value < 0:
            raise ValueError(f"all-to-all cost {name} must be >= 0, got {value}")
    pair = max(f + b, a2a_f + a2a_b) if overlap else f + b + a2a_f + a2a_b
    return Costs(f=f + a2a_f, b=b + a2a_b, w=w, fb=pair, p2p=p2p)
