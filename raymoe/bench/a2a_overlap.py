"""What ``schedule.overlap_a2a`` hides: DualPipe(V) at pp=2 x ep=2 with the F&B pairs run sequentially vs with
their forward and backward chunks at the same time, on the same four workers and the same batches, alternated
step by step (both layouts are loaded side by side on the actors).

Per layout: the step time and the time inside the F&B actions (min / median / max over steps), and the seconds
the workers spent inside all-to-all calls. With the pairs sequential every one of those seconds blocks its
rank: that is the *blocking* time. The time overlap saves is the step-time difference; what stays exposed is
blocking minus saved, and the hidden fraction is 1 - exposed / blocking = saved / blocking.

The honest caveat of this machine: four single-threaded workers on two cores, and with overlap each worker runs
two threads. gloo moves bytes on background threads that need a free core to make progress while compute runs,
and there is none; so what is hidden here is bounded by the cores, not by the schedule. On a GPU the exchange has
its own engine (DeepEP's 20 SMs, NVLink/IB DMA) and the paper's DualPipe hides a 1:1 compute:communication ratio.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from raymoe.bench.load import machine_load, spread

PRESET = "small"
SCHEDULES = ("dualpipev", "dualpipe")
MICROBATCHES = 8
STEPS, QUICK_STEPS = 10, 3
WARMUP = 1


def _config(schedule: str, overlap: bool, steps: int):
    from raymoe.config import load_config

    return load_config(PRESET, [
        "parallel.pp=2", "parallel.ep=2", "parallel.dp=2", "parallel.cpus_per_worker=0.5",
        f"schedule.name={schedule}", f"schedule.num_microbatches={MICROBATCHES}",
        f"schedule.overlap_a2a={str(overlap).lower()}", f"run.steps={steps}", "data.batch_size=32",
    ])


def _fb_seconds(report) -> float:
    """The slowest rank's time inside F&B actions in one step."""
    return max(sum(t.end_s - t.start_s for t in r.timings if t.kind == "FB") for r in report.results)


def measure(schedule: str, steps: int) -> dict:
    from raymoe.parallel.topology import Topology
    from raymoe.runtime.driver import Driver
    from raymoe.runtime.worker_group import WorkerGroup

    group = WorkerGroup(Topology(pp=2, ep=2, dp=2), num_cpus_per_worker=0.5).start()
    drivers = {}
    try:
        for overlap in (False, True):
            drivers[overlap] = Driver(_config(schedule, overlap, steps), worker_group=group).start()
        samples = {False: [], True: []}
        loads = []
        for step in range(steps):
            batch = drivers[False].batches.next_batch()
            for overlap, driver in drivers.items():
                report = driver.step(batch)
                if step >= WARMUP:
                    samples[overlap].append(report)
            loads.append(machine_load()["loadavg_1m"])
    finally:
        for driver in drivers.values():
            driver.close()
        group.shutdown()
    return summarize(schedule, samples, loads)


def summarize(schedule: str, samples: dict, loads: list[float]) -> dict:
    def layout(reports) -> dict:
        return {
            "step_s": spread([r.wall_s for r in reports]),
            "fb_s": spread([_fb_seconds(r) for r in reports]),
            "a2a_s_max_rank": spread([r.record["a2a_seconds_max"] for r in reports]),
        }

    off, on = layout(samples[False]), layout(samples[True])
    blocking = off["a2a_s_max_rank"]["median"]
    saved = off["step_s"]["median"] - on["step_s"]["median"]
    ratios = [b.wall_s / a.wall_s for a, b in zip(samples[False], samples[True])]
    return {
        "schedule": schedule, "off": off, "on": on, "step_ratio_on_off": spread(ratios),
        "blocking_a2a_s": blocking, "saved_s": saved, "exposed_a2a_s": blocking - saved,
        "hidden_fraction": saved / blocking if blocking else 0.0, "loadavg_1m": spread(loads),
    }


def simulated_one_to_one() -> list[dict]:
    """The paper's regime: communication equal to compute (a2a_f = f, a2a_b = b) on its own engine; the step of
    each schedule with and without overlap, from the same action lists (``raymoe.schedule.a2a_costs``)."""
    from raymoe.schedule import build_schedule, simulate
    from raymoe.schedule.a2a_costs import a2a_costs

    rows = []
    for name, pp, m in (("dualpipe", 8, 20), ("dualpipev", 8, 20), ("1f1b", 8, 20), ("dualpipev", 2, 8)):
        schedule = build_schedule(name, pp, m)
        step = {overlap: simulate(schedule, a2a_costs(f=1.0, b=2.0, w=1.0, a2a_f=1.0, a2a_b=2.0,
                                                       overlap=overlap)).makespan for overlap in (False, True)}
        rows.append({"schedule": name, "pp": pp, "microbatches": m, "step_off": step[False], "step_on": step[True]})
    return rows


def markdown(results: dict) -> str:
    lines = ["| schedule (small, pp=2 x ep=2, 8 micro-batches) | step s off / on (median) | on/off per step "
             "median (min-max) | F&B s off / on | a2a blocking s (off) | saved s | hidden |",
             "|---|---|---|---|---|---|---|"]
    for r in results["layouts"]:
        ratio = r["step_ratio_on_off"]
        lines.append(
            f"| {r['schedule']} | {r['off']['step_s']['median']:.3f} / {r['on']['step_s']['median']:.3f} | "
            f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | {r['off']['fb_s']['median']:.3f} / "
            f"{r['on']['fb_s']['median']:.3f} | {r['blocking_a2a_s']:.3f} | {r['saved_s']:.3f} | "
            f"{100 * r['hidden_fraction']:.0f}% |")
    lines += ["", "Simulated, compute:all-to-all 1:1 on a separate engine (F=1, B=2 and the same again in all-to-all;"
              " `raymoe.schedule.a2a_costs`):", "",
              "| schedule | pp | micro-batches | step, pairs sequential | step, overlapped | on / off |",
              "|---|---|---|---|---|---|"]
    for r in results["simulated"]:
        lines.append(f"| {r['schedule']} | {r['pp']} | {r['microbatches']} | {r['step_off']:.0f} | "
                     f"{r['step_on']:.0f} | {r['step_on'] / r['step_off']:.2f} |")
    loads = [r["loadavg_1m"] for r in results["layouts"]]
    lines.append(f"\nLoad average (1 min) while measuring: {min(x['min'] for x in loads):.2f}-"
                 f"{max(x['max'] for x in loads):.2f}; 4 workers x 2 threads on {machine_load()['cpus']} cores.")
    return "\n".join(lines)


def run(out_dir: Path, *, quick: bool = False) -> dict:
    from raymoe.runtime.session import ray_session

    steps = QUICK_STEPS if quick else STEPS
    with ray_session(num_cpus=2):
        layouts = [measure(schedule, steps) for schedule in (SCHEDULES[:1] if quick else SCHEDULES)]
    results = {"preset": PRESET, "quick": quick, "machine": machine_load(), "layouts": layouts,
               "simulated": simulated_one_to_one()}
    results["markdown"] = markdown(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "a2a_overlap.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "a2a_overlap.md").write_text(results["markdown"] + "\n")
    return {"markdown": results["markdown"], "hidden_fraction": {
        r["schedule"]: r["hidden_fraction"] for r in layouts}, "median_step_ratio": statistics.median(
        r["step_ratio_on_off"]["median"] for r in layouts)}
