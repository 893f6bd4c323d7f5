"""Distributed (Ray actors, gloo, ZeRO-1 / ZeRO-2) == single-process reference, per layout.

Default suite: every schedule at pp=2 dp=1 on one shared worker group, one dp=2 layout (DeepSpeed ZeRO-1), one
pp=4 layout and one ZeRO-2 layout (1f1b pp=1 dp=2). The full matrix {gpipe, 1f1b, zb1p, dualpipe, dualpipev} x
pp {2, 4} x dp {1, 2} and the other ZeRO-2 layouts are ``slow``.

Tolerances (fp32), the issue's: loss 1e-6 relative, gradients and first-step parameter updates 1e-5 (relative
norm difference per tensor). The reference adds the micro-batch gradients in the layout's order
(``raymoe.runtime.parity.reduction_tree``: per dp shard, per DualPipe copy, then the all-reduce sums): fp32
addition is not associative, and AdamW's first step ``lr * g / (|g| + eps)`` turns a 1e-7 reordering difference
of a gradient element within a few eps of zero into a visible update difference. For the same reason both sides
sum the global gradient norm in float64 (``raymoe.train.clip``): summed in fp32 per ZeRO partition, dp rank and
stage, it moved the clip factor by one ulp in three dp=2 layouts, and that alone put RMSNorm weights (near 1.0,
where one fp32 ulp is ~1e-5 of a first update) at 1e-5. The optimizer path itself is checked on the workers' own
gradients (``max_rel_update_diff_same_grads``).
"""

from __future__ import annotations

import json

import pytest
import torch

from raymoe.config import load_config
from raymoe.parallel.topology import Topology

pytestmark = pytest.mark.ray

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


def layout(schedule: str, pp: int, dp: int, microbatches: int | None = None, *extra: str):
    microbatches = microbatches or 2 * pp
    overrides = [
        f"parallel.pp={pp}",
        f"parallel.dp={dp}",
        f"schedule.name={schedule}",
        f"schedule.num_microbatches={microbatches}",
        f"data.batch_size={max(8, dp * microbatches)}",
        *extra,
    ]
    if schedule == "dualpipev" and pp == 4:
        overrides.append("model.num_layers=8")  # 2 * pp chunks of >= 1 layer
    return load_config("debug", overrides)


def check(report) -> None:
    """The tolerances above. With dp > 2 the optimizer-path check gets the 1e-5 bar of the update itself: the
    captured gradients are averaged by one gloo all-reduce, DeepSpeed's by its own reduce, and four fp32 addends
    summed in another order differ by an ulp (two addends never do), which AdamW's first step turns into ~1e-5 on
    a norm weight (measured 9.97e-6 at ep=4 dp=4)."""
    print(json.dumps({k: v for k, v in report.to_dict().items() if k not in ("losses", "losses_ref")}))
    assert report.loss_rel_diff < 1e-6, report
    assert report.max_loss_rel_diff_trajectory < 1e-6, report
    assert report.max_rel_grad_diff < 1e-5, report
    assert report.grad_norm_rel_diff < 1e-5, report
    assert report.max_rel_update_diff_same_grads < (1e-6 if report.dp <= 2 else 1e-5), report
    assert report.max_rel_update_diff < 1e-5, report
    assert report.max_rel_param_diff_final < 1e-5, report


def run(worker_groups, config, steps: int = 3):
    from raymoe.runtime.parity import run_parity

    p = config.parallel
    group = worker_groups.get(Topology(pp=p.pp, ep=p.ep, dp=p.dp))
    return run_parity(config, steps=steps, worker_group=group)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_dp1_every_schedule(worker_groups, schedule):
    check(run(worker_groups, layout(schedule, 2, 1)))


def test_pp2_dp2_zero1_halves_optimizer_state(worker_groups):
    replicated = run(worker_groups, layout("dualpipev", 2, 1), steps=1)
    sharded = run(worker_groups, layout("dualpipev", 2, 2))
    check(sharded)
    # ranks are pp-major: [pp0 dp0, pp0 dp1, pp1 dp0, pp1 dp1]
    for pp_rank, full in enumerate(replicated.optimizer_state_bytes_per_rank):
        for part in sharded.optimizer_state_bytes_per_rank[2 * pp_rank : 2 * pp_rank + 2]:
            assert abs(part - full / 2) <= 0.01 * full, (part, full)


@pytest.mark.parametrize("schedule", ["zb1p", "dualpipev"])
def test_bf16_autocast_through_ray(worker_groups, schedule):
    """precision.dtype=bf16 (autocast compute, fp32 master weights) through the Ray workers, ZeRO-1 dp=2.

    ZB1P's deferred weight GEMMs run in bf16 and sum a weight's two uses (output head: main and MTP logits) in
    bf16 before one cast, as autograd does behind autocast's cached weight cast: the first step matches the bf16
    reference as tightly as fp32 does (the trajectory then drifts at bf16's resolution: 5.8e-5 in the weights
    after 3 steps). DualPipeV's whole (unsplit) backwards run plain ``F.linear`` (``raymoe.parallel.weight_grad``),
    so they too sum the head's two uses as the reference does (before, when every linear of a splitting rank was
    a deferring autograd function, they were summed in fp32: 7.6e-4 on the head's gradient).
    """
    from dataclasses import replace

    config = layout(schedule, 2, 2)
    config = replace(config, precision=replace(config.precision, dtype="bf16"))
    report = run(worker_groups, config)
    print(json.dumps({k: v for k, v in report.to_dict().items() if k not in ("losses", "losses_ref")}))
    assert report.loss_rel_diff < 1e-6 and report.max_loss_rel_diff_trajectory < 1e-4, report
    assert report.max_rel_update_diff_same_grads < 1e-6 and report.max_rel_param_diff_final < 0.05, report
    assert report.max_rel_grad_diff < 1e-5 and report.max_rel_update_diff < 1e-5, report


def test_pp4_dualpipe(worker_groups):
    check(run(worker_groups, layout("dualpipe", 4, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)  # the bottom decorator varies slowest: one worker group per
@pytest.mark.parametrize("dp", [1, 2])  # (pp, dp), shared by the five schedules
@pytest.mark.parametrize("pp", [2, 4])
def test_full_matrix(worker_groups, schedule, pp, dp):
    check(run(worker_groups, layout(schedule, pp, dp)))


def test_zero2_pp1_dp2_partitions_gradients_and_optimizer_state(worker_groups):
    """ZeRO-2 at pp=1: the reference's gradients and updates, and per rank ~1/dp of the gradients and of the Adam
    state that replicated AdamW (ZeRO-0, same ranks) holds."""
    config = layout("1f1b", 1, 2, 2, "parallel.zero_stage=2")
    replicated = run(worker_groups, layout("1f1b", 1, 2, 2, "parallel.zero_stage=0"), steps=1)
    sharded = run(worker_groups, config)
    check(sharded)
    # Adam state: half, up to ZeRO's alignment padding.
    for full, part in zip(replicated.optimizer_state_bytes_per_rank, sharded.optimizer_state_bytes_per_rank):
        assert abs(part - full / 2) <= 0.01 * full, (part, full)
    # Gradients: half, up to one tensor. DeepSpeed keeps the gradients of its partition's parameters as whole
    # tensors, so the one straddling the boundary between the two partitions is held by both ranks; the largest
    # tensor of the debug model is the embedding (vocab x dim, fp32).
    full = replicated.gradient_bytes_per_rank
    assert full[0] > 0 and full[0] == full[1]  # replicated: every rank holds every gradient
    largest = config.model.vocab_size * config.model.dim * 4
    parts = sharded.gradient_bytes_per_rank
    assert all(part <= full[0] / 2 + largest for part in parts), (parts, full)
    assert full[0] <= sum(parts) <= full[0] + largest, (parts, full)


ZERO2_SLOW = [
    ("gpipe", 1), ("zb1p", 1), ("dualpipev", 1),  # pp=1: every schedule that runs there
    ("dualpipev", 2), ("1f1b", 2, "mtp.depth=0"), ("zb1p", 2, "mtp.depth=0"),  # pp > 1: nothing replicated
]


@pytest.mark.slow
@pytest.mark.parametrize("case", ZERO2_SLOW, ids=lambda c: "-".join(map(str, c)))
def test_zero2_layouts(worker_groups, case):
    schedule, pp, *extra = case
    check(run(worker_groups, layout(schedule, pp, 2, None, "parallel.zero_stage=2", *extra)))


def test_bf16_optimizer_states_through_deepspeed_zero(worker_groups):
    """precision.bf16_optimizer_states: the ZeRO-1 partition's Adam moments are BF16 (half the bytes), the step
    still tracks the fp32-moment run closely."""
    from raymoe.runtime.driver import Driver

    results = {}
    for bf16 in (False, True):
        config = load_config(
            "debug",
            [
                "parallel.pp=1",
                "parallel.dp=2",
                "schedule.name=1f1b",
                "schedule.num_microbatches=2",
                f"precision.bf16_optimizer_states={'true' if bf16 else 'false'}",
            ],
        )
        group = worker_groups.get(Topology(pp=1, ep=1, dp=2))
        driver = Driver(config, worker_group=group).start()
        try:
            tokens = torch.randint(
                0, 260, (config.data.batch_size, config.data.seq_len + 2), generator=torch.Generator().manual_seed(0)
            )
            reports = [driver.step(tokens) for _ in range(2)]
        finally:
            driver.finish()
        results[bf16] = reports
    for r in results[False][-1].results:  # every step says what the worker process used (getrusage)
        assert set(r.cpu) == {"user_s", "sys_s", "minor_faults", "involuntary_switches"} and r.cpu["user_s"] > 0
    fp32_bytes = [r.optimizer_state_bytes for r in results[False][-1].results]
    bf16_bytes = [r.optimizer_state_bytes for r in results[True][-1].results]
    for full, half in zip(fp32_bytes, bf16_bytes):
        assert half == pytest.approx(full / 2, rel=0.02)
    assert results[True][-1].record["loss"] == pytest.approx(results[False][-1].record["loss"], rel=1e-3)
