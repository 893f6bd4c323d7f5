"""Calibrate the planner on what we can run: a CPU device entry from a GEMM probe, then the planner's per-action
costs against the measured action timings of a real Ray run (``RUN_DIR/actions.jsonl``).

    python -m raymoe.bench.plan_calibration RUN_DIR [--out FILE.json]

The probe times, on one thread (each Ray worker runs torch with one thread), an fp32 GEMM at the shapes of the
``small`` preset's layers (512 tokens x 128 -> 384), a batched attention-shaped product and a streaming add; the
CPU entry takes those as its "bf16" (compute-dtype), attention and memory throughputs. Links are the gloo figures
measured on this machine (DESIGN.md: a 4 MiB all-to-all between two local actors in ~2-3 ms, ~1.6 GB/s).

Then ``plan_step`` prices the run's own config and layout on that entry (fp32, no SMs lent to communication:
``comm_sm_fraction=0``), and each (kind, chunk)'s predicted seconds is set beside the mean measured duration of the
same actions in the run (the first step, which warms up allocators, left out).

Two more columns say where a gap comes from. *Isolated*: the same chunk's forward and full backward on one
micro-batch of the same shape, timed here in one process on one thread (``PipelineStage.forward_chunk``, the
module the workers run), so no other rank or engineer shares its core: measured-in-run / isolated is contention.
*Dispatch*: the aten operators that chunk's forward and backward execute (counted with a dispatch mode) times the
probed cost of one tiny operator: what the FLOP/byte model leaves out, and what dominates a model this small.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raymoe.plan.devices import DeviceSpec
from raymoe.plan.step import StepPlan

GLOO_LOCAL_GBPS = 1.6


def _best_seconds(fn, *, repeats: int = 7, inner: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def probe_cpu_device(*, threads: int = 1) -> DeviceSpec:
    """A ``cpu`` device entry measured here (module docstring)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(512, 128, generator=gen), torch.randn(128, 384, generator=gen)
        gemm = 2 * 512 * 128 * 384 / _best_seconds(lambda: a @ b) / 1e12
        q, k = torch.randn(16, 128, 48, generator=gen), torch.randn(16, 48, 128, generator=gen)
        attention = 2 * 16 * 128 * 48 * 128 / _best_seconds(lambda: torch.bmm(q, k)) / 1e12
        x, y = torch.randn(4_000_000, generator=gen), torch.randn(4_000_000, generator=gen)
        stream = 3 * 4 * x.numel() / _best_seconds(lambda: torch.add(x, y), inner=5) / 1e9
    finally:
        torch.set_num_threads(previous)
    return DeviceSpec(
        name="cpu", bf16_tflops=gemm, fp8_tflops=0.0, attention_tflops=attention, peak_bf16_tflops=gemm,
        memory_gb=8.0, hbm_gbps=stream, intra_node_gbps=GLOO_LOCAL_GBPS, inter_node_gbps=GLOO_LOCAL_GBPS,
        devices_per_node=os.cpu_count() or 1,
        source=f"measured here on {threads} thread(s): fp32 GEMM 512x128x384 {gemm * 1e3:.1f} GFLOP/s (the CPU "
               f"presets compute in fp32, so it fills the compute-dtype slot), attention-shaped bmm "
               f"{attention * 1e3:.1f} GFLOP/s, streaming add {stream:.1f} GB/s; gloo links 1.6 GB/s (DESIGN.md); "
               f"memory_gb 8 is a placeholder",
    )


def probe_op_seconds(*, threads: int = 1) -> float:
    """Seconds of one tiny eager operator with autograd recording: the per-op dispatch floor."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(8, requires_grad=True)
        return _best_seconds(lambda: x * 1.5, inner=2000)
    finally:
        torch.set_num_threads(previous)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def isolated_chunks(cfg, plan: StepPlan, *, threads: int = 1, repeats: int = 5) -> dict[int, dict[str, float]]:
    """Per chunk: forward and full-backward seconds (median of ``repeats``) and aten ops, one thread, this process."""
    from raymoe.model import build_model
    from raymoe.parallel.stage_plan import PipelineStage, plan_stages

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(cfg, seed=cfg.run.seed)
        stages = plan_stages(cfg.model.num_layers, len(plan.chunks), tuple(plan.layout.stage_layers))
        stage = PipelineStage(model, stages, range(len(plan.chunks)))
        batch = plan.tokens_per_microbatch // cfg.data.seq_len
        gen = torch.Generator().manual_seed(0)
        tokens_BL = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len + 1 + cfg.mtp.depth),
                                  generator=gen)
        out = {}
        for c in range(len(plan.chunks)):
            def run(c=c, counter=None):
                x = None if c == 0 else torch.randn(batch, cfg.data.seq_len, cfg.model.dim, generator=gen,
                                                      requires_grad=True)
                start = time.perf_counter()
                with counter or _nullcontext():
                    result = stage.forward_chunk(c, x, tokens_BL, cfg.mtp.loss_weight)
                mid = time.perf_counter()
                fwd_ops = counter.count if counter else 0
                with counter or _nullcontext():
                    if result.hidden_BTD is None:
                        result.objective.backward()
                    else:  # the chunk's balance losses join the backward when it has MoE layers
                        outs = [result.hidden_BTD] + ([result.objective] if result.objective.requires_grad else [])
                        torch.autograd.backward(outs, [torch.ones_like(result.hidden_BTD)] + [None] * (len(outs) - 1))
                end = time.perf_counter()
                stage.zero_grad(set_to_none=True)
                return mid - start, end - mid, fwd_ops, (counter.count - fwd_ops) if counter else 0

            run()  # warm-up
            times = [run() for _ in range(repeats)]
            counter = _OpCounter()
            _, _, f_ops, b_ops = run(counter=counter)
            out[c] = {"f_s": statistics.median(t[0] for t in times), "b_s": statistics.median(t[1] for t in times),
                      "f_ops": f_ops, "b_ops": b_ops}
        return out
    finally:
        torch.set_num_threads(previous)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def measured_action_costs(run_dir: Path, placement) -> dict[tuple[str, int], list[float]]:
    """Durations of every measured compute action by (kind, chunk), steps after the first."""
    from raymoe.report.records import iter_actions, read_jsonl

    rows = read_jsonl(run_dir / "actions.jsonl").rows
    actions = list(iter_actions(rows))
    first = min(a.step for a in actions)
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for a in actions:
        if a.step > first:
            out[a.kind, placement.info(a.stage).chunk].append(a.duration)
    return out


def measured_makespans(run_dir: Path) -> list[float]:
    """Each step's pipeline makespan (steps after the first), as ``raymoe report`` measures it."""
    from raymoe.report.records import iter_actions, read_jsonl
    from raymoe.report.timings import group_by_step, step_timings

    steps = group_by_step(iter_actions(read_jsonl(run_dir / "actions.jsonl").rows))
    first = min(steps, default=0)
    return [step_timings(acts).makespan for step, acts in sorted(steps.items()) if step > first]


def calibrate(run_dir: str | Path) -> dict:
    from raymoe.plan.assumptions import Assumptions
    from raymoe.plan.memory import Layout
    from raymoe.plan.step import plan_step
    from raymoe.report.records import read_config

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    device = probe_cpu_device()
    par = cfg.parallel
    layout = Layout(pp=par.pp, ep=par.ep, dp=par.dp, zero_stage=par.zero_stage, schedule=cfg.schedule.name,
                    stage_layers=tuple(par.stage_layers))
    plan = plan_step(cfg, layout, device=device, assume=Assumptions(comm_sm_fraction=0.0))
    measured = measured_action_costs(run_dir, _placement(plan))
    op_s = probe_op_seconds()
    isolated = isolated_chunks(cfg, plan)
    rows = []
    for (kind, chunk), durations in sorted(measured.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        predicted = plan.costs.per_chunk.get((kind, chunk))
        if predicted is None:
            continue
        median = statistics.median(durations)
        row = {"kind": kind, "chunk": chunk, "samples": len(durations), "measured_mean_s": statistics.fmean(durations),
               "measured_median_s": median, "predicted_s": predicted,
               "measured_over_predicted": median / predicted if predicted else None}
        iso = isolated[chunk]
        if kind in ("F", "B", "FB"):  # the kinds the isolated run times (FB on a CPU: F then B)
            row["isolated_s"] = {"F": iso["f_s"], "B": iso["b_s"], "FB": iso["f_s"] + iso["b_s"]}[kind]
            ops = {"F": iso["f_ops"], "B": iso["b_ops"], "FB": iso["f_ops"] + iso["b_ops"]}[kind]
            row["aten_ops"] = ops
            row["predicted_plus_dispatch_s"] = predicted + ops * op_s
        rows.append(row)
    makespans = measured_makespans(run_dir)
    ratios = sorted(r["measured_over_predicted"] for r in rows if r["measured_over_predicted"])
    summary = {"min": ratios[0], "median": statistics.median(ratios), "max": ratios[-1]} if ratios else {}
    return {"run_dir": str(run_dir), "device": device.as_dict(), "op_dispatch_s": op_s, "load_avg": os.getloadavg(),
            "actions": rows, "measured_over_predicted": summary, "predicted_makespan_s": plan.sim.makespan,
            "measured_makespan_s": {"min": min(makespans), "median": statistics.median(makespans),
                                    "max": max(makespans)} if makespans else {}}


def _placement(plan):
    from raymoe.schedule import stage_placement

    return stage_placement(plan.layout.schedule, plan.layout.pp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    result = calibrate(args.run_dir)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    dev = result["device"]
    print(f"cpu entry: {dev['source']}")
    print(f"one dispatched op: {result['op_dispatch_s'] * 1e6:.1f} us")
    print(f"{'kind':>4} {'chunk':>5} {'n':>5} {'run median ms':>14} {'predicted ms':>13} {'run/pred':>9} "
          f"{'isolated ms':>12} {'ops':>6} {'pred+dispatch ms':>17}")
    for r in result["actions"]:
        iso = f"{r['isolated_s'] * 1e3:>12.2f} {r['aten_ops']:>6} {r['predicted_plus_dispatch_s'] * 1e3:>17.2f}" \
            if "isolated_s" in r else ""
        print(f"{r['kind']:>4} {r['chunk']:>5} {r['samples']:>5} {r['measured_median_s'] * 1e3:>14.2f} "
              f"{r['predicted_s'] * 1e3:>13.2f} {r['measured_over_predicted']:>9.2f} {iso}")
    if result["measured_over_predicted"]:
        s = result["measured_over_predicted"]
        print(f"measured/predicted min {s['min']:.2f} median {s['median']:.2f} max {s['max']:.2f}; "
              f"load average at calibration {tuple(round(x, 2) for x in result['load_avg'])}")
    if result["measured_makespan_s"]:
        m = result["measured_makespan_s"]
        print(f"pipeline makespan: measured min {m['min'] * 1e3:.1f} / median {m['median'] * 1e3:.1f} / max "
              f"{m['max'] * 1e3:.1f} ms, predicted {result['predicted_makespan_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
