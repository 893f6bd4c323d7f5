"""Overlapping consecutive actions of a schedule without F&B pairs (1F1B), and why we do not run it that way.

The only dependency-free neighbours in 1F1B's steady state are a backward and the forward after it, B(m) then
F(m + k) on the same stage: different micro-batches. ``pair_consecutive`` turns each such neighbour pair into an
F&B action, which the executor then runs in turns with its all-to-alls hidden (``schedule.overlap_a2a``); the
result passes the deadlock and dependency checks like any list. (Pairing the other neighbours, F(m + k) then
B(m), deadlocks: the forward's output would wait for a gradient that itself waits for that output one rank
down; ``check_schedule`` finds the cycle at pp=2.)

It does not pay. A pair starts only once both its inputs are there, so the forward that 1F1B runs while the
gradient is still on its way now waits for it, and each half's output leaves with the pair, later than alone;
the phase model (``raymoe.schedule.phases``) predicts a paired, overlapped 1F1B 10-39% *slower* than plain
1F1B at pp = 2..8 for compute:communication 1:1 to 1:3 (``benchmarks/results/a2a_overlap.md``; a trial model
in which each half's sends leave the moment that half finishes was still 13-30% slower). That is DualPipe's
point: its pairs join the two directions' chunks, which do not wait on each other. So ``schedule.overlap_a2a``
leaves 1F1B's lists alone; ``pair_consecutive`` is here for the simulator and the benchmark's comparison
(``write_csv`` of a paired schedule loads into ``raymoe simulate --csv``).
"""

from __future__ import annotations

from raymoe.schedule.action import Action, Kind, overlapped


def pair_consecutive(actions: list[Action]) -> list[Action]:
    """One rank's compute-only list with every backward B(m) and the forward right after it, on the same stage
    and another micro-batch, joined into one F&B action."""
    out: list[Action] = []
    i = 0
    while i < len(actions):
        a = actions[i]
        b = actions[i + 1] if i + 1 < len(actions) else None
        if (b is not None and a.kind is Kind.B and b.kind is Kind.F and a.stage == b.stage
                and a.microbatch != b.microbatch):
            out.append(overlapped(b.stage, b.microbatch, a.stage, a.microbatch))
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def paired_schedule(name: str, pp: int, num_microbatches: int):
    """The named one-stage-per-rank schedule (``1f1b``, ``gpipe``) with its consecutive B/F neighbours paired;
    checked like any list (its communication derived anew for the pairs)."""
    from raymoe.schedule.build import build_schedule, schedule_from_actions

    plain = build_schedule(name, pp, num_microbatches)
    paired = {r: pair_consecutive(list(plain.compute_actions(r))) for r in range(pp)}
    return schedule_from_actions(paired, placement=plain.placement, name=f"{plain.name}-paired",
                                 num_microbatches=num_microbatches)
