"""Pipeline schedules on real Ray workers vs the simulator's prediction from their own measured costs.

For pp in {2, 4}, one worker group per pp holds all five schedules (gpipe, 1f1b, zb1p, dualpipe, dualpipev)
loaded side by side on the same actors, and the benchmark *alternates* them step by step (schedule A step k,
B step k, ...), so swings in machine load hit every schedule alike. Per layout it reports:

* ``pipeline_s``: the measured time of the pipeline part of a step (the latest end of any rank's last compute
  action, from the moment the rank started executing);
* ``predicted_s``: the makespan ``raymoe.schedule.simulate`` predicts for the same action lists with the per-kind
  mean costs this layout's executors measured (F, B, W, FB; I = B - W as the simulator models it; P2P 0), and
  ``ratio`` = measured / predicted (target <= 1.15 at pp=4);
* ``step_s`` (driver wall time of the step), ``worker_s`` (the slowest worker's ``run_step``), ``optimizer_s``,
  ``driver_overhead_s`` = step_s - worker_s (batching, object store, Ray round trip, aggregation);
* min / median / max over the measured steps, and the machine's load average while they ran.

DualPipe(V) vs 1F1B: the step-time ratio measured in the same run, next to the ratio the simulator predicts.

Caveats that matter on the development machine (2 cores shared with other work): pp=4 puts 4 single-threaded
workers on 2 cores, so ranks that are busy at the same time slow each other down, which a simulator of one
processor per rank cannot predict; and the per-kind mean costs hide that the last chunk (output head + MTP) is
heavier than the others. Both push measured / predicted above 1; the numbers are reported as measured.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from raymoe.bench.load import machine_load, spread

PRESET = "small"
SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")
PIPELINES = (2, 4)
MICROBATCHES = 8
NUM_LAYERS = 8  # DualPipeV at pp=4 cuts the model into 8 chunks
OVERRIDES = [f"model.num_layers={NUM_LAYERS}"]
STEPS, QUICK_STEPS = 12, 3
WARMUP = 1


def _config(schedule: str, pp: int, steps: int):
    from raymoe.config import load_config

    return load_config(PRESET, OVERRIDES + [
        f"parallel.pp={pp}", f"schedule.name={schedule}", f"schedule.num_microbatches={MICROBATCHES}",
        f"run.steps={steps}",
    ])


def mean_costs(results_per_step: list[list]) -> dict[str, float]:
    """Mean duration per action kind over every rank and step."""
    durations: dict[str, list[float]] = defaultdict(list)
    for results in results_per_step:
        for result in results:
            for t in result.timings:
                durations[t.kind].append(t.end_s - t.start_s)
    return {kind: statistics.fmean(values) for kind, values in durations.items()}


def simulator_costs(means: dict[str, float]):
    """``raymoe.schedule.Costs`` from measured means: B = I + W where a schedule splits every backward."""
    from raymoe.schedule import Costs

    f = means.get("F", 0.0)
    w = means.get("W", 0.0)
    b = means["B"] if "B" in means else means.get("I", 0.0) + w
    return Costs(f=f, b=max(b, w), w=w, fb=means.get("FB"), p2p=0.0)


def pipeline_time(results) -> float:
    return max((r.timings[-1].end_s for r in results if r.timings), default=0.0)


def measure(pp: int, steps: int) -> dict:
    """Run every schedule at ``pp`` on one worker group, alternating step by step."""
    import ray

    from raymoe.parallel.topology import Topology
    from raymoe.runtime.driver import Driver
    from raymoe.runtime.worker_group import WorkerGroup
    from raymoe.schedule import simulate

    # pp=4 on a 2-core machine: ask for a fraction of a CPU per worker (oversubscribed on purpose, see above).
    cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / pp)
    group = WorkerGroup(Topology(pp=pp), num_cpus_per_worker=cpus).start()
    drivers = {}
    try:
        for name in SCHEDULES:
            drivers[name] = Driver(_config(name, pp, steps), worker_group=group).start()
        samples: dict[str, list] = {name: [] for name in SCHEDULES}
        loads = []
        for step in range(steps):
            for name, driver in drivers.items():
                report = driver.step()
                if step >= WARMUP:
                    samples[name].append(report)
            loads.append(machine_load()["loadavg_1m"])
        out = {"pp": pp, "microbatches": MICROBATCHES, "cpus_per_worker": cpus, "startup_s": group.startup_s,
               "loadavg_1m": spread(loads), "schedules": {}}
        for name, reports in samples.items():
            means = mean_costs([r.results for r in reports])
            costs = simulator_costs(means)
            predicted = simulate(drivers[name].schedule, costs).makespan
            measured = [pipeline_time(r.results) for r in reports]
            out["schedules"][name] = {
                "costs_s": means,
                "simulator_costs": str(costs),
                "predicted_s": predicted,
                "pipeline_s": spread(measured),
                "ratio": statistics.median(measured) / predicted if predicted else None,
                "step_s": spread([r.wall_s for r in reports]),
                "worker_s": spread([r.record["worker_step_s"] for r in reports]),
                "optimizer_s": spread([r.record["optimizer_s_max"] for r in reports]),
                "driver_overhead_s": spread([r.record["driver_overhead_s"] for r in reports]),
                "stage_forward_s": _per_stage_forward(reports),
                "cores_busy": statistics.median(
                    sum(r.compute_s for r in rep.results) / pipeline_time(rep.results) for rep in reports
                ),
                "loss_last": reports[-1].record["loss"] if reports else None,
            }
        return out
    finally:
        for driver in drivers.values():
            driver.close()
        group.shutdown()


def _per_stage_forward(reports) -> dict[int, float]:
    per_stage: dict[int, list[float]] = defaultdict(list)
    for report in reports:
        for result in report.results:
            for t in result.timings:
                if t.kind == "F":
                    per_stage[t.stage].append(t.end_s - t.start_s)
    return {stage: statistics.fmean(v) for stage, v in sorted(per_stage.items())}


def compare_dualpipe(layout: dict) -> dict:
    """DualPipe(V) / 1F1B step time: measured (same run), simulated with each schedule's own measured costs, and
    simulated with 1F1B's per-chunk costs for both (the schedule alone, as if the machine had a core per rank)."""
    from raymoe.schedule import Costs, build_schedule, simulate

    pp = layout["pp"]
    one = layout["schedules"]["1f1b"]
    per_layer = {k: v / (NUM_LAYERS // pp) for k, v in one["costs_s"].items()}
    out = {}
    for name in ("dualpipe", "dualpipev"):
        s = layout["schedules"][name]
        layers = NUM_LAYERS // (2 * pp) if name == "dualpipev" else NUM_LAYERS // pp
        f, b = per_layer["F"] * layers, per_layer["B"] * layers
        same = Costs(f=f, b=b, w=b / 3, fb=f + b)  # no F&B overlap gain on CPU; W ~ 1/3 of B as measured
        baseline = Costs(f=one["costs_s"]["F"], b=one["costs_s"]["B"], w=one["costs_s"]["B"] / 3)
        out[name] = {
            "measured_pipeline_ratio": s["pipeline_s"]["median"] / one["pipeline_s"]["median"],
            "measured_step_ratio": s["step_s"]["median"] / one["step_s"]["median"],
            "predicted_ratio": s["predicted_s"] / one["predicted_s"],
            "predicted_ratio_same_costs": simulate(build_schedule(name, pp, MICROBATCHES), same).makespan
            / simulate(build_schedule("1f1b", pp, MICROBATCHES), baseline).makespan,
        }
    return out


def _fmt(value) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(results: dict) -> str:
    lines = [
        "| pp | schedule | pipeline s (median) | predicted s | measured/predicted | step s (min/med/max) | "
        "driver overhead s | cores busy | vs 1F1B measured | vs 1F1B predicted | vs 1F1B, 1F1B's costs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layout in results["layouts"]:
        pp = layout["pp"]
        vs = layout["dualpipe_vs_1f1b"]
        for name, s in layout["schedules"].items():
            step = s["step_s"]
            rel = vs.get(name, {})
            lines.append(
                f"| {pp} | {name} | {s['pipeline_s']['median']:.3f} | {s['predicted_s']:.3f} | {s['ratio']:.2f} | "
                f"{step['min']:.3f} / {step['median']:.3f} / {step['max']:.3f} | "
                f"{s['driver_overhead_s']['median']:.3f} | {s['cores_busy']:.2f} | "
                f"{_fmt(rel.get('measured_pipeline_ratio'))} | {_fmt(rel.get('predicted_ratio'))} | "
                f"{_fmt(rel.get('predicted_ratio_same_costs'))} |"
            )
    loads = ", ".join(f"pp={x['pp']}: {x['loadavg_1m']['min']:.1f}-{x['loadavg_1m']['max']:.1f}"
                      for x in results["layouts"])
    lines.append("")
    lines.append(f"_{results['preset']} preset ({' '.join(OVERRIDES)}), {MICROBATCHES} micro-batches, dp=1, "
                 f"{results['steps']} steps per schedule ({WARMUP} warm-up dropped), schedules alternated step by "
                 f"step on the same actors; 1-minute load average during the runs: {loads} on "
                 f"{results['machine']['cpus']} CPUs._")
    return "\n".join(lines)


def run(out_dir: Path, *, quick: bool = False) -> dict:
    import ray

    from raymoe.runtime.launch import init_ray

    steps = QUICK_STEPS if quick else STEPS
    started = init_ray()
    try:
        layouts = []
        for pp in PIPELINES[:1] if quick else PIPELINES:
            layout = measure(pp, steps)
            layout["dualpipe_vs_1f1b"] = compare_dualpipe(layout)
            layouts.append(layout)
    finally:
        if started:
            ray.shutdown()
    results = {"preset": PRESET, "steps": steps, "quick": quick, "machine": machine_load(), "layouts": layouts}
    results["markdown"] = markdown(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "runtime_schedules.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "runtime_schedules.md").write_text(results["markdown"] + "\n")
    return {"markdown": results["markdown"], "layouts": [
        {"pp": x["pp"], "ratios": {n: s["ratio"] for n, s in x["schedules"].items()},
         "dualpipe_vs_1f1b": x["dualpipe_vs_1f1b"]} for x in layouts]}
