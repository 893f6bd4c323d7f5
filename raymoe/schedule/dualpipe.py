"""DualPipe and DualPipeV (DeepSeek-V3 report, section 3.2.1) as compute-only action lists.

Both schedules are the same eight-step program run on every rank; only its step counts depend on the rank.
Each rank holds two stages, called *phase 0* and *phase 1* below:

* DualPipe, pp ranks, h = pp/2: rank r has half-rank hr = min(r, pp-1-r). On the first half of the ranks phase 0
  is the forward-direction copy (stage r) and phase 1 the reverse copy (stage 2*pp-1-r); on the second half the
  roles swap, which makes rank r and rank pp-1-r mirror images. Each copy carries n/2 micro-batches.
* DualPipeV, pp ranks, h = pp: rank r (hr = r) has phase 0 = stage r (going down the V) and phase 1 = stage
  2*pp-1-r (coming back up). It is DualPipe "cut in half" (Sea AI Lab): one copy, all n micro-batches.

Steps of rank hr out of h, with n_c micro-batches per copy (names as in deepseek-ai/DualPipe; "F0" = forward of
phase 0, "B1" = backward of phase 1, "F0B1" = one overlapped F&B chunk):

    step 1  nF0        2(h-hr-1)   F0
    step 2  nF0F1      hr+1        F0, F1
    step 3  nB1W1F1    h-hr-1      I1, W, F1        zero bubble: input gradient first, its W right after
    step 4  nF0B1F1B0  n_c-2h+hr+1 F0B1, F1B0       the main, fully overlapped step
    step 5  nB1F1B0    h-hr-1      B1, F1B0
    step 6  nB1B0      hr+1        B1, B0           the second half of these are I's (zero bubble)
    step 7  nWB0       h-hr-1      W, I0
    step 8  nW         hr+1        W

Micro-batches run in order within a phase (its k-th forward and its k-th backward are micro-batch k of that
phase's copy), and W's run first-in first-out over the pending I's.
"""

from __future__ import annotations

from collections import deque

from raymoe.schedule.action import Action, Kind, act, overlapped

# An abstract op: ("F", phase), ("B", phase), ("I", phase), ("W",), ("FB", forward phase, backward phase).
Op = tuple


def phase_program(h: int, hr: int, n_per_copy: int) -> list[Op]:
    """The eight steps for half-rank ``hr`` of ``h``, in phase terms."""
    ops: list[Op] = []
    # Step 1: nF0
    ops += [("F", 0)] * (2 * (h - hr - 1))
    # Step 2: nF0F1
    ops += [("F", 0), ("F", 1)] * (hr + 1)
    # Step 3: nB1W1F1 (zero bubble)
    ops += [("I", 1), ("W",), ("F", 1)] * (h - hr - 1)
    # Step 4 (main step): nF0B1F1B0
    for i in range(n_per_copy - 2 * h + hr + 1):
        if i == 0 and hr == h - 1:
            # The middle ranks do not overlap their first F0 and B1: F0's output is what the other middle rank
            # (or, in DualPipeV, this rank's own phase 1) waits for, so sending it early shrinks the bubble.
            ops += [("F", 0), ("B", 1)]
        else:
            ops.append(("FB", 0, 1))
        ops.append(("FB", 1, 0))
    # Step 5: nB1F1B0
    ops += [("B", 1), ("FB", 1, 0)] * (h - hr - 1)
    # Step 6: nB1B0 (the second half of these backwards defer their W: zero bubble)
    zero_bubble = False
    for i in range(hr + 1):
        if i == (hr + 1) // 2 and hr % 2 == 1:
            zero_bubble = True
        ops.append(("I" if zero_bubble else "B", 1))
        if i == (hr + 1) // 2 and hr % 2 == 0:
            zero_bubble = True
        ops.append(("I" if zero_bubble else "B", 0))
    # Step 7: nWB0 (zero bubble)
    ops += [("W",), ("I", 0)] * (h - hr - 1)
    # Step 8: nW
    ops += [("W",)] * (hr + 1)
    return ops


def dualpipe(pp: int, num_microbatches: int) -> dict[int, list[Action]]:
    n_c = num_microbatches // 2
    out = {}
    for r in range(pp):
        second_half = r >= pp // 2
        stage_of_copy = (r, 2 * pp - 1 - r)
        # phase p is copy p on the first half of the ranks and copy 1-p on the second half
        stages = tuple(stage_of_copy[p ^ second_half] for p in (0, 1))
        first_mb = tuple((p ^ second_half) * n_c for p in (0, 1))
        out[r] = _bind(phase_program(pp // 2, min(r, pp - 1 - r), n_c), stages, first_mb)
    return out


def dualpipe_v(pp: int, num_microbatches: int) -> dict[int, list[Action]]:
    return {r: _bind(phase_program(pp, r, num_microbatches), (r, 2 * pp - 1 - r), (0, 0)) for r in range(pp)}


def _bind(program: list[Op], stages: tuple[int, int], first_mb: tuple[int, int]) -> list[Action]:
    """Turn phase ops into actions: phase p's k-th forward (backward) is micro-batch first_mb[p] + k."""
    next_f, next_b = [0, 0], [0, 0]
    pending_w: deque[tuple[int, int]] = deque()
    out = []

    def forward(p: int) -> tuple[int, int]:
        next_f[p] += 1
        return stages[p], first_mb[p] + next_f[p] - 1

    def backward(p: int) -> tuple[int, int]:
        next_b[p] += 1
        return stages[p], first_mb[p] + next_b[p] - 1

    for op in program:
        if op[0] == "F":
            out.append(act(Kind.F, *forward(op[1])))
        elif op[0] == "B":
            out.append(act(Kind.B, *backward(op[1])))
        elif op[0] == "I":
            stage_mb = backward(op[1])
            pending_w.append(stage_mb)
            out.append(act(Kind.I, *stage_mb))
        elif op[0] == "W":
            out.append(act(Kind.W, *pending_w.popleft()))
        else:  # FB: forward of phase op[1] overlapped with the backward of phase op[2]
            out.append(overlapped(*forward(op[1]), *backward(op[2])))
    assert not pending_w, "every I's W runs before the end of the step"
    return out
