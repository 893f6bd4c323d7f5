"""One stage per rank: GPipe, 1F1B and ZB1P (zero-bubble 1F1B), as compute-only action lists.

Rank r holds stage r. Legend for the comments: p = pp (ranks = stages), n = micro-batches, r = rank.

* GPipe: every forward, then every backward. Simple, and n micro-batches of activations stay live.
* 1F1B: rank r warms up with p-1-r forwards, then alternates one forward with one backward, then drains the
  backwards. At most p-r micro-batches are live on rank r (p on rank 0).
* ZB1P (Qi et al., "Zero Bubble Pipeline Parallelism", ZB-H1): 1F1B with each backward split into I (gradient
  w.r.t. the input, on the critical path to the previous rank) and W (gradient w.r.t. the weights, which nothing
  waits for). Rank r keeps up to r W's pending and runs them at the end, where 1F1B would idle in the
  cool-down; the warm-up and the live-activation count stay those of 1F1B.
"""

from __future__ import annotations

from raymoe.schedule.action import Action, Kind, act


def gpipe(pp: int, num_microbatches: int) -> dict[int, list[Action]]:
    n = num_microbatches
    return {r: [act(Kind.F, r, m) for m in range(n)] + [act(Kind.B, r, m) for m in range(n)] for r in range(pp)}


def one_f_one_b(pp: int, num_microbatches: int) -> dict[int, list[Action]]:
    return {r: _one_f_one_b_rank(pp, r, num_microbatches) for r in range(pp)}


def _one_f_one_b_rank(pp: int, r: int, n: int) -> list[Action]:
    warmup = min(pp - 1 - r, n)
    out = [act(Kind.F, r, m) for m in range(warmup)]
    for m in range(n - warmup):  # steady state: 1F1B
        out += [act(Kind.F, r, warmup + m), act(Kind.B, r, m)]
    out += [act(Kind.B, r, m) for m in range(n - warmup, n)]  # cool-down
    return out


def zb1p(pp: int, num_microbatches: int) -> dict[int, list[Action]]:
    return {r: _zb1p_rank(pp, r, num_microbatches) for r in range(pp)}


def _zb1p_rank(pp: int, r: int, n: int) -> list[Action]:
    warmup = min(pp - 1 - r, n)
    # Rank r holds back up to r W's. The backward-for-input chain runs from the last rank to rank 0, so
    # deferring W's on the later ranks lets the I's reach the earlier ranks sooner; the held-back W's then
    # fill the later ranks' cool-down, where 1F1B would idle waiting for the last forwards and backwards.
    max_pending = r
    out = [act(Kind.F, r, m) for m in range(warmup)]
    next_w = 0
    for m in range(n):
        if warmup + m < n:
            out.append(act(Kind.F, r, warmup + m))
        out.append(act(Kind.I, r, m))
        if m + 1 - next_w > max_pending:  # one W more than allowed pending: run the oldest now
            out.append(act(Kind.W, r, next_w))
            next_w += 1
    out += [act(Kind.W, r, m) for m in range(next_w, n)]
    return out
