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

from raymoe.plan.devices import DeviceSpec

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
    rows = []
    for (kind, chunk), durations in sorted(measured.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        predicted = plan.costs.per_chunk.get((kind, chunk))
        if predicted is None:
            continue
        mean = statistics.fmean(durations)
        rows.append({"kind": kind, "chunk": chunk, "samples": len(durations), "measured_mean_s": mean,
                     "measured_median_s": statistics.median(durations), "predicted_s": predicted,
                     "measured_over_predicted": mean / predicted if predicted else None})
    ratios = sorted(r["measured_over_predicted"] for r in rows if r["measured_over_predicted"])
    summary = {"min": ratios[0], "median": statistics.median(ratios), "max": ratios[-1]} if ratios else {}
    return {"run_dir": str(run_dir), "device": device.as_dict(), "load_avg": os.getloadavg(), "actions": rows,
            "measured_over_predicted": summary, "predicted_makespan_s": plan.sim.makespan}


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
    print(f"{'kind':>4} {'chunk':>5} {'n':>5} {'measured ms':>12} {'predicted ms':>13} {'measured/predicted':>19}")
    for r in result["actions"]:
        print(f"{r['kind']:>4} {r['chunk']:>5} {r['samples']:>5} {r['measured_mean_s'] * 1e3:>12.2f} "
              f"{r['predicted_s'] * 1e3:>13.2f} {r['measured_over_predicted']:>19.2f}")
    if result["measured_over_predicted"]:
        s = result["measured_over_predicted"]
        print(f"measured/predicted min {s['min']:.2f} median {s['median']:.2f} max {s['max']:.2f}; "
              f"load average at calibration {tuple(round(x, 2) for x in result['load_avg'])}")


if __name__ == "__main__":
    main()
