"""What ``schedule.overlap_a2a`` hides: DualPipe(V) at pp=2 x ep=2 with the F&B pairs run one half after the
other vs in turns (``raymoe.parallel.interleave``), on the same four workers and the same batches, alternated
step by step (both layouts are loaded side by side on the actors).

Measured per layout (min / median / max over steps): the step time, the time inside F&B actions, the seconds the
slowest rank's all-to-alls took from issue to result, and the seconds it *waited* for them (exposed). Without
overlap every exchange blocks: the exposed time is the *blocking* time. With overlap the exposed time is what the
other chunk's compute did not cover; hidden fraction = 1 - exposed(on) / blocking(off), measured directly.

Through the phase model (``raymoe.schedule.phases``, ``raymoe.bench.phase_fit``):

* **replay**: every action rebuilt from its own measured phases (a pair from its measured turns), simulated, vs
  the measured pipeline makespan of the same step: checks that the time model is the executor's;
* **prediction**: mean per-phase costs of the sequential run predict the overlapped step, and the same compute
  with communication set to the paper's 1:1 ratio on its own engine predicts what the schedule hides on a GPU;
* a timeline picture of a measured overlapped step and of the 1:1 prediction, all-to-all lanes under compute.

The honest caveat of this machine: four single-threaded workers on two cores (0.5 core each). gloo moves bytes
on background threads that need a free core to make progress while compute runs, and there is none; so what is
hidden here is bounded by the cores, not by the schedule. On a GPU the exchange has its own engine (DeepEP's 20
SMs, NVLink/IB DMA) and the paper's DualPipe hides a 1:1 compute:communication ratio.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from raymoe.bench.load import machine_load, spread
from raymoe.bench.results import write_results

PRESET = "small"
SCHEDULES = ("dualpipev", "dualpipe")
MICROBATCHES = 8
CPUS_PER_WORKER = 0.5
STEPS, QUICK_STEPS = 10, 3
WARMUP = 1


def _config(schedule: str, overlap: bool, steps: int):
    from raymoe.config import load_config

    return load_config(PRESET, [
        "parallel.pp=2", "parallel.ep=2", "parallel.dp=2", f"parallel.cpus_per_worker={CPUS_PER_WORKER}",
        f"schedule.name={schedule}", f"schedule.num_microbatches={MICROBATCHES}",
        f"schedule.overlap_a2a={str(overlap).lower()}", f"run.steps={steps}", "data.batch_size=32",
    ])


def _fb_seconds(report) -> float:
    """The slowest rank's time inside F&B actions in one step."""
    return max(sum(t.end_s - t.start_s for t in r.timings if t.kind == "FB") for r in report.results)


def measure(schedule: str, steps: int) -> tuple[dict, object]:
    """Both layouts alternated step by step; returns (samples by overlap, the schedule), samples are
    (report, load) per counted step."""
    from raymoe.parallel.topology import Topology
    from raymoe.runtime.driver import Driver
    from raymoe.runtime.worker_group import WorkerGroup

    group = WorkerGroup(Topology(pp=2, ep=2, dp=2), num_cpus_per_worker=CPUS_PER_WORKER).start()
    drivers = {}
    try:
        for overlap in (False, True):
            drivers[overlap] = Driver(_config(schedule, overlap, steps), worker_group=group).start()
        samples = {False: [], True: []}
        for step in range(steps):
            batch = drivers[False].batches.next_batch()
            for overlap, driver in drivers.items():
                report = driver.step(batch)
                if step >= WARMUP:
                    samples[overlap].append((report, machine_load()["loadavg_1m"]))
        sched = drivers[False].schedule
    finally:
        for driver in drivers.values():
            driver.close()
        group.shutdown()
    return samples, sched


def _pipeline(report) -> list:
    """One pipeline's results (dp rank 0): what the schedule's timeline is made of."""
    return sorted((r for r in report.results if r.dp_rank == 0), key=lambda r: r.pp_rank)


def summarize(schedule_name: str, samples: dict, schedule, out_dir: Path | None = None) -> dict:
    from raymoe.bench import phase_fit
    from raymoe.bench import schedule_fit as fit
    from raymoe.schedule import Costs

    def layout(pairs, overlap: bool) -> dict:
        reports = [r for r, _ in pairs]
        timelines = [fit.step_timeline(schedule, _pipeline(r)) for r in reports]
        p2p = fit.p2p_latency(timelines) or 0.0
        action_replay = [tl.makespan / fit.replay(tl, Costs(p2p=p2p)) for tl in timelines]
        phase_replay = [tl.makespan / phase_fit.replay_phases(schedule, _pipeline(r), overlap=overlap, p2p=p2p)
                        for tl, r in zip(timelines, reports)]
        return {
            "step_s": spread([r.wall_s for r in reports]),
            "pipeline_s": spread([tl.makespan for tl in timelines]),
            "fb_s": spread([_fb_seconds(r) for r in reports]),
            "a2a_s_max_rank": spread([r.record["a2a_seconds_max"] for r in reports]),
            "a2a_exposed_s_max_rank": spread([r.record["a2a_exposed_seconds_max"] for r in reports]),
            "p2p_s": p2p,
            "replay_ratio_actions": spread(action_replay),
            "replay_ratio_phases": spread(phase_replay),
            "loadavg_1m": spread([load for _, load in pairs]),
        }

    off, on = layout(samples[False], False), layout(samples[True], True)
    blocking = off["a2a_exposed_s_max_rank"]["median"]
    exposed = on["a2a_exposed_s_max_rank"]["median"]
    ratios = [b.wall_s / a.wall_s for (a, _), (b, _) in zip(samples[False], samples[True])]

    steps_off = [_pipeline(r) for r, _ in samples[False]]
    means = phase_fit.mean_programs(schedule, steps_off)
    p2p = off["p2p_s"]
    predicted = {overlap: phase_fit.predicted(schedule, means, overlap=overlap, p2p=p2p)[0].makespan
                 for overlap in (False, True)}
    one_to_one = phase_fit.at_ratio(means, 1.0)
    predicted_1to1 = {overlap: phase_fit.predicted(schedule, one_to_one, overlap=overlap, p2p=p2p)
                      for overlap in (False, True)}
    compute = sum(p.total_compute for p in means.values())
    comm = sum(p.total_a2a for p in means.values())
    result = {
        "schedule": schedule_name, "cpus_per_worker": CPUS_PER_WORKER, "off": off, "on": on,
        "step_ratio_on_off": spread(ratios),
        "blocking_a2a_s": blocking, "exposed_a2a_s": exposed,
        "hidden_fraction": 1.0 - exposed / blocking if blocking else 0.0,
        "saved_s": off["step_s"]["median"] - on["step_s"]["median"],
        "measured_comm_to_compute": comm / compute if compute else 0.0,
        "predicted_off_s": predicted[False], "predicted_on_s": predicted[True],
        "predicted_on_vs_measured": on["pipeline_s"]["median"] / predicted[True] if predicted[True] else None,
        "predicted_1to1_off": predicted_1to1[False][0].makespan,
        "predicted_1to1_on": predicted_1to1[True][0].makespan,
        "mean_programs": {f"{k}@{c}": {"compute": p.compute, "a2a": p.a2a} for (k, c), p in means.items()},
    }
    if out_dir is not None:
        _plots(schedule, samples[True], predicted_1to1[True], p2p, out_dir, schedule_name)
    return result


def _plots(schedule, on_samples, predicted_1to1, p2p: float, out_dir: Path, name: str) -> None:
    """The median measured overlapped step replayed from its phases, and the 1:1 prediction, with lanes; both
    timed with the measured P2P latency, as the replay ratios and the predictions are."""
    from raymoe.bench import phase_fit
    from raymoe.schedule.phases import simulate_phased
    from raymoe.schedule.timeline import plot_timeline

    reports = sorted((r for r, _ in on_samples), key=lambda r: r.wall_s)
    middle = _pipeline(reports[len(reports) // 2])
    costs = phase_fit.step_phases(schedule, middle, overlap=True)
    replayed = simulate_phased(schedule, costs, p2p=p2p)
    plot_timeline(schedule, replayed, out_dir / f"a2a_overlap_{name}_measured.png", lanes=costs,
                  title=f"{name} pp=2 x ep=2, overlap on: a measured step, replayed ({replayed.makespan:.2f} s)")
    simulated, lanes = predicted_1to1
    plot_timeline(schedule, simulated, out_dir / f"a2a_overlap_{name}_1to1.png", lanes=lanes,
                  title=f"{name} pp=2 x ep=2, overlap on: measured compute, all-to-all 1:1 "
                        f"({simulated.makespan:.2f} s)")


def simulated_one_to_one() -> list[dict]:
    """The paper's regime with uniform chunks: communication equal to compute (a2a_f = f, a2a_b = b) on its own
    engine, two MoE layers (four exchanges) per chunk; the step with and without overlap from the same action
    lists, and 1F1B with its B/F neighbours paired (``raymoe.schedule.pairing``)."""
    from raymoe.schedule import build_schedule
    from raymoe.schedule.pairing import paired_schedule
    from raymoe.schedule.phases import phased_costs, simulate_phased, uniform_programs

    programs = uniform_programs(f=1.0, b=2.0, w=1.0, a2a_f=1.0, a2a_b=2.0, exchanges=4)

    def step(schedule, overlap: bool) -> float:
        return simulate_phased(schedule, phased_costs(schedule, programs, overlap=overlap)).makespan

    rows = []
    for name, pp, m in (("dualpipe", 8, 20), ("dualpipev", 8, 20), ("1f1b", 8, 20), ("dualpipev", 2, 8),
                        ("1f1b", 2, 8)):
        schedule = build_schedule(name, pp, m)
        row = {"schedule": name, "pp": pp, "microbatches": m, "step_off": step(schedule, False),
               "step_on": step(schedule, True)}
        if name == "1f1b":
            row["step_paired_on"] = step(paired_schedule(name, pp, m), True)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = [f"| schedule (small, pp=2 x ep=2, {MICROBATCHES} micro-batches, {CPUS_PER_WORKER} core per worker) | "
             "step s off / on (median) | on/off per step median (min-max) | a2a s issue-to-result off / on | "
             "a2a s waited: blocking (off) / exposed (on) | hidden | replay / measured, phases: off / on |",
             "|---|---|---|---|---|---|---|"]
    for r in results["layouts"]:
        ratio, off, on = r["step_ratio_on_off"], r["off"], r["on"]
        lines.append(
            f"| {r['schedule']} | {off['step_s']['median']:.3f} / {on['step_s']['median']:.3f} | "
            f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | "
            f"{off['a2a_s_max_rank']['median']:.3f} / {on['a2a_s_max_rank']['median']:.3f} | "
            f"{r['blocking_a2a_s']:.3f} / {r['exposed_a2a_s']:.3f} | {100 * r['hidden_fraction']:.0f}% | "
            f"{1 / off['replay_ratio_phases']['median']:.3f} / {1 / on['replay_ratio_phases']['median']:.3f} |")
    lines += ["", "Predicted from the sequential run's measured phases (pipeline makespan, s): as measured here, "
              "and with the same compute but all-to-all = compute (1:1) on its own engine:", "",
              "| schedule | measured comm/compute | predicted off / on | measured on / predicted on | "
              "1:1 predicted off / on | 1:1 on/off |", "|---|---|---|---|---|---|"]
    for r in results["layouts"]:
        lines.append(f"| {r['schedule']} | {r['measured_comm_to_compute']:.2f} | {r['predicted_off_s']:.3f} / "
                     f"{r['predicted_on_s']:.3f} | {r['predicted_on_vs_measured']:.2f} | "
                     f"{r['predicted_1to1_off']:.3f} / {r['predicted_1to1_on']:.3f} | "
                     f"{r['predicted_1to1_on'] / r['predicted_1to1_off']:.2f} |")
    lines += ["", "Simulated, uniform chunks, compute:all-to-all 1:1 on a separate engine (F=1, B=2 and the same "
              "again in all-to-all over 4 exchanges per chunk; `raymoe.schedule.phases`):", "",
              "| schedule | pp | micro-batches | step, pairs sequential | step, overlapped | on / off |",
              "|---|---|---|---|---|---|"]
    for r in results["simulated"]:
        lines.append(f"| {r['schedule']} | {r['pp']} | {r['microbatches']} | {r['step_off']:.1f} | "
                     f"{r['step_on']:.1f} | {r['step_on'] / r['step_off']:.2f} |")
        if "step_paired_on" in r:
            lines.append(f"| {r['schedule']}, B/F neighbours paired | {r['pp']} | {r['microbatches']} | "
                         f"{r['step_off']:.1f} (plain) | {r['step_paired_on']:.1f} | "
                         f"{r['step_paired_on'] / r['step_off']:.2f} |")
    loads = [r[k]["loadavg_1m"] for r in results["layouts"] for k in ("off", "on")]
    lines.append(f"\nLoad average (1 min) while measuring: {min(x['min'] for x in loads):.2f}-"
                 f"{max(x['max'] for x in loads):.2f}; 4 workers ({CPUS_PER_WORKER} core each) on "
                 f"{machine_load()['cpus']} cores.")
    return "\n".join(lines)


def run(out_dir: Path, *, quick: bool = False) -> dict:
    from raymoe.runtime.session import ray_session

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = QUICK_STEPS if quick else STEPS
    layouts = []
    with ray_session(num_cpus=2):
        for name in SCHEDULES[:1] if quick else SCHEDULES:
            samples, schedule = measure(name, steps)
            layouts.append(summarize(name, samples, schedule, out_dir))
    results = {"preset": PRESET, "quick": quick, "machine": machine_load(), "layouts": layouts,
               "simulated": simulated_one_to_one()}
    results["markdown"] = markdown(results)
    write_results(out_dir, "a2a_overlap", results)
    return {"markdown": results["markdown"], "hidden_fraction": {
        r["schedule"]: r["hidden_fraction"] for r in layouts}, "median_step_ratio": statistics.median(
        r["step_ratio_on_off"]["median"] for r in layouts)}
