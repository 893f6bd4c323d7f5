"""Pipeline schedules on real Ray workers vs the simulator's prediction from their own measured costs.

For pp in {2, 4}, one worker group per pp holds all five schedules (gpipe, 1f1b, zb1p, dualpipe, dualpipev)
loaded side by side on the same actors, and the benchmark *alternates* them step by step (schedule A step k,
B step k, ...), so swings in machine load hit every schedule alike. Per layout it reports:

* ``pipeline_s``: the measured makespan of the pipeline part of a step: from the first rank's start to the end of
  the last compute action of any rank, on one clock (``schedule_fit.step_timeline``; ``skew_s`` is how much
  later the last rank started);
* ``predicted_s``: the makespan ``raymoe.schedule.simulate`` predicts for the same action lists from the costs
  fitted to this layout's measured timings (``schedule_fit.per_chunk_costs``): the mean cost of each kind on each
  model chunk (F, B, I, W, FB; the last chunk also runs the output head and MTP) and the measured per-message
  P2P latency; ``ratio`` = measured / predicted (target <= 1.15 at pp=4);
* ``ratio_per_kind``: the same with one mean per kind for every chunk and P2P 0 (this benchmark's first model),
  ``ratio_no_p2p`` with per-chunk costs but P2P 0, and ``replay_ratio``: measured / the simulator replaying each
  step with every action's own measured duration (median over steps). The replay isolates the time model (data
  flow + P2P) from the cost averaging: replay_ratio near 1 with ``ratio`` above it means the mean costs, not the
  model of the executor, miss the time;
* ``step_s`` (driver wall time of the step), ``worker_s`` (the slowest worker's ``run_step``), ``optimizer_s``,
  ``driver_overhead_s`` = step_s - worker_s (batching, object store, Ray round trip, aggregation);
* min / median / max over the measured steps, and the machine's load average while they ran.

DualPipe(V) vs 1F1B: the step-time ratio measured in the same run, next to the ratio the simulator predicts.

Why measured / predicted still is not 1 on the development machine (2 cores shared with other work): pp=4 puts
4 single-threaded workers on 2 cores, so an action is slower while more ranks compute at the same time; a mean
cost per (kind, chunk) averages fast and slow phases, and a makespan is a max over paths, so it is not the
makespan of the mean costs. A simulator of one processor per rank cannot model that sharing; the numbers are
reported as measured.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from raymoe.bench import schedule_fit as fit
from raymoe.bench.load import machine_load, spread
from raymoe.bench.results import write_results

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


def measure(pp: int, steps: int) -> dict:
    """Run every schedule at ``pp`` on one worker group, alternating step by step."""
    from raymoe.parallel.topology import Topology
    from raymoe.runtime.driver import Driver
    from raymoe.runtime.session import cluster_cpus
    from raymoe.runtime.worker_group import WorkerGroup

    # pp=4 on a 2-core machine: ask for a fraction of a CPU per worker (oversubscribed on purpose, see above).
    cpus = min(1.0, cluster_cpus() / pp)
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
            out["schedules"][name] = summarize(drivers[name].schedule, reports)
        return out
    finally:
        for driver in drivers.values():
            driver.close()
        group.shutdown()


def summarize(schedule, reports) -> dict:
    """Measured vs predicted for one schedule's reports (dp = 1: every step's results form one pipeline)."""
    from raymoe.schedule import simulate

    timelines = [fit.step_timeline(schedule, r.results) for r in reports]
    measured = statistics.median(tl.makespan for tl in timelines)
    costs = fit.per_chunk_costs(timelines)
    per_kind = fit.per_kind_costs(timelines)
    predicted = simulate(schedule, costs).makespan
    predicted_per_kind = simulate(schedule, per_kind).makespan
    predicted_no_p2p = simulate(schedule, replace(costs, p2p=0.0)).makespan
    return {
        "costs_s": fit.kind_means(timelines),
        "chunk_costs_s": {f"{kind}@{chunk}": v for (kind, chunk), v in costs.per_chunk.items()},
        "p2p_s": costs.p2p,
        "simulator_costs": str(costs),
        "simulator_costs_per_kind": str(per_kind),
        "predicted_s": predicted,
        "predicted_per_kind_s": predicted_per_kind,
        "predicted_no_p2p_s": predicted_no_p2p,
        "pipeline_s": spread([tl.makespan for tl in timelines]),
        "skew_s": spread([tl.skew for tl in timelines]),
        "ratio": measured / predicted if predicted else None,
        "ratio_per_kind": measured / predicted_per_kind if predicted_per_kind else None,
        "ratio_no_p2p": measured / predicted_no_p2p if predicted_no_p2p else None,
        "replay_ratio": statistics.median(tl.makespan / fit.replay(tl, costs) for tl in timelines),
        "step_s": spread([r.wall_s for r in reports]),
        "worker_s": spread([r.record["worker_step_s"] for r in reports]),
        "optimizer_s": spread([r.record["optimizer_s_max"] for r in reports]),
        "driver_overhead_s": spread([r.record["driver_overhead_s"] for r in reports]),
        "recv_wait_s": spread([sum(x.recv_wait_s for x in r.results) for r in reports]),
        "cores_busy": statistics.median(
            sum(s.duration for spans in tl.spans.values() for s in spans) / tl.makespan for tl in timelines
        ),
        "loss_last": reports[-1].record["loss"] if reports else None,
    }


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
            "predicted_ratio_per_kind": s["predicted_per_kind_s"] / one["predicted_per_kind_s"],
            "predicted_ratio_same_costs": simulate(build_schedule(name, pp, MICROBATCHES), same).makespan
            / simulate(build_schedule("1f1b", pp, MICROBATCHES), baseline).makespan,
        }
    return out


def _fmt(value) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(results: dict) -> str:
    lines = [
        "| pp | schedule | pipeline s (median) | predicted s | measured/predicted | per-kind costs, P2P 0 | "
        "per-chunk, P2P 0 | measured/replayed | P2P ms | step s (min/med/max) | driver overhead s | cores busy | "
        "vs 1F1B measured | vs 1F1B predicted | vs 1F1B, 1F1B's costs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layout in results["layouts"]:
        pp = layout["pp"]
        vs = layout["dualpipe_vs_1f1b"]
        for name, s in layout["schedules"].items():
            step = s["step_s"]
            rel = vs.get(name, {})
            lines.append(
                f"| {pp} | {name} | {s['pipeline_s']['median']:.3f} | {s['predicted_s']:.3f} | {s['ratio']:.2f} | "
                f"{_fmt(s['ratio_per_kind'])} | {_fmt(s['ratio_no_p2p'])} | {_fmt(s['replay_ratio'])} | "
                f"{s['p2p_s'] * 1e3:.1f} | {step['min']:.3f} / {step['median']:.3f} / {step['max']:.3f} | "
                f"{s['driver_overhead_s']['median']:.3f} | {s['cores_busy']:.2f} | "
                f"{_fmt(rel.get('measured_pipeline_ratio'))} | {_fmt(rel.get('predicted_ratio'))} | "
                f"{_fmt(rel.get('predicted_ratio_same_costs'))} |"
            )
    loads = ", ".join(f"pp={x['pp']}: {x['loadavg_1m']['min']:.1f}-{x['loadavg_1m']['max']:.1f}"
                      for x in results["layouts"])
    skews = [s["skew_s"]["median"] * 1e3 for x in results["layouts"] for s in x["schedules"].values()]
    lines.append("")
    lines.append(f"_{results['preset']} preset ({' '.join(OVERRIDES)}), {MICROBATCHES} micro-batches, dp=1, "
                 f"{results['steps']} steps per schedule ({WARMUP} warm-up dropped), schedules alternated step by "
                 f"step on the same actors; 1-minute load average during the runs: {loads} on "
                 f"{results['machine']['cpus']} CPUs. Predicted: simulator with per-(kind, chunk) mean costs and "
                 f"the measured P2P latency; replayed: each step's own action durations; ranks started "
                 f"{min(skews):.0f}-{max(skews):.0f} ms apart (median skew)._")
    return "\n".join(lines)


def run(out_dir: Path, *, quick: bool = False) -> dict:
    from raymoe.runtime.session import ray_session

    steps = QUICK_STEPS if quick else STEPS
    with ray_session():
        layouts = []
        for pp in PIPELINES[:1] if quick else PIPELINES:
            layout = measure(pp, steps)
            layout["dualpipe_vs_1f1b"] = compare_dualpipe(layout)
            layouts.append(layout)
    results = {"preset": PRESET, "steps": steps, "quick": quick, "machine": machine_load(), "layouts": layouts}
    results["markdown"] = markdown(results)
    write_results(out_dir, "runtime_schedules", results)
    return {"markdown": results["markdown"], "layouts": [
        {"pp": x["pp"], "ratios": {n: s["ratio"] for n, s in x["schedules"].items()},
         "dualpipe_vs_1f1b": x["dualpipe_vs_1f1b"]} for x in layouts]}
