"""How close a pipeline step comes to what its schedule promises: pp=2 pipelines vs the single-process trainer.

The measurement (issue 15): the ``small`` preset with 8 layers, 8 and 4 micro-batches of 1 x 128 tokens, fp32,
pp=2 dp=1. DualPipe, DualPipeV and 1F1B are loaded side by side on the same two worker actors, and every step of
every pipeline is paired with a step of the single-process ``ReferenceTrainer`` (one thread, in this process) on
the same global batch, run right before it. Each timed call waits until other processes use less than
``LOAD_THRESHOLD`` cores (``raymoe.bench.load.wait_for_quiet``; our own Ray processes do not count), and the load
seen is recorded. Per pipeline:

* step time (driver wall time) min / median / max, the reference's, their ratio median/median and the
  distribution of the per-step ratios (each pipeline step over the reference step next to it);
* the *ideal*: the simulator on this schedule with every action costing what its chunk costs alone
  (``chunk_costs.measure_chunks``, measured here beforehand), scaled so that the chunks add up to the
  reference's forward+backward (``_on_reference_footing``), plus the reference's optimizer time scaled by the
  share of the model the busiest rank updates (all of it under DualPipe, whose ranks hold both copies' chunks);
* the breakdown: compute excess = per-rank compute summed over ranks / the reference's forward+backward on the
  same micro-batches; optimizer (incl. the DualPipe copy sums) against the reference optimizer, and the part of
  it still spent summing copies after the last backward; waiting on receives; driver overhead (step wall time
  minus the slowest worker's ``run_step``); what the workers spent in the kernel and their page faults;
* where the compute excess starts from: the same micro-batches through one worker (pp=1, ``single_worker``),
  and the same forward+backward here, in Ray actors and in plain processes, alone and two at once
  (``raymoe.bench.contention``);
  and what it costs before any runtime (``order_alone``): the model cut into chunks run in turn, and every
  rank's action list run one action at a time in this process (``raymoe.bench.schedule_order``).

Also measured standalone (same gating): a whole-model forward+backward with ``nn.Linear`` vs ``DeferredLinear``
on each of its paths (``raymoe.parallel.weight_grad``), and the stage balance the simulator picks from
per-layer costs (``chunk_costs.best_stage_layers``); where it predicts a gain above ``BALANCE_MIN_GAIN`` the
balanced layout runs as one more pipeline.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from raymoe.bench import chunk_costs, contention
from raymoe.bench.deferred_overhead import deferred_linear_overhead
from raymoe.bench.load import machine_load, spread, wait_for_quiet
from raymoe.bench.results import write_results
from raymoe.report.timings import COMPUTE_KINDS

PRESET = "small"
NUM_LAYERS = 8
PP = 2
SCHEDULES = ("dualpipe", "dualpipev", "1f1b")
MICROBATCHES, QUICK_MICROBATCHES = (8, 4), (4,)
STEPS, QUICK_STEPS = 15, 2
WARMUP, QUICK_WARMUP = 2, 1
LOAD_THRESHOLD = 0.15
"""Cores other processes may use while a step is timed."""
GATE_TIMEOUT_S = 120.0
BALANCE_MIN_GAIN = 0.01
CONTENTION_ROUNDS = {False: 8, True: 1}
CONTENTION_ITERATIONS = {False: 5, True: 2}
MTP_WEIGHT_STANDALONE = 0.3
ORDER_ROUNDS = {False: 6, True: 1}


def config_for(schedule: str, microbatches: int, steps: int, stage_layers=(), pp: int = PP):
    from raymoe.config import load_config

    return load_config(PRESET, overrides_for(schedule, microbatches, steps, stage_layers, pp))


def overrides_for(schedule: str, microbatches: int, steps: int, stage_layers=(), pp: int = PP) -> list[str]:
    overrides = [f"model.num_layers={NUM_LAYERS}", f"parallel.pp={pp}", f"schedule.name={schedule}",
                 f"schedule.num_microbatches={microbatches}", f"data.batch_size={microbatches}",
                 f"run.steps={steps}"]
    if stage_layers:
        overrides.append(f"parallel.stage_layers=[{','.join(map(str, stage_layers))}]")
    return overrides


class Gate:
    """``wait_for_quiet`` before each timed call, remembering what it saw (quick runs do not wait)."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.seen: list[dict] = []

    def __call__(self) -> dict:
        seen = wait_for_quiet(float("inf") if self.quick else LOAD_THRESHOLD, window_s=0.1 if self.quick else 0.3,
                              timeout_s=GATE_TIMEOUT_S)
        self.seen.append(seen)
        return seen


def standalone(microbatches: int, tokens_BL: torch.Tensor, gate: Gate, repeats: int) -> dict:
    """Per-chunk costs of each schedule's cut, per-layer costs, and the simulator's stage balance.

    Before each repeat the whole model runs a forward+backward on the same micro-batch
    (``contention.ForwardBackward``, timed as ``whole_micro_s``): timed back to back, a chunk's weights stay in
    its core's cache from one repeat to the next, which a pipeline chunk never sees (per-layer costs summed to
    0.80 of the whole model that way).
    """
    from raymoe.schedule import build_schedule

    config = config_for("1f1b", microbatches, 1)
    micro_BL = tokens_BL[:1]
    whole_pass = contention.ForwardBackward(PRESET, overrides_for("1f1b", microbatches, 1), micro_BL,
                                            MTP_WEIGHT_STANDALONE)
    whole: list[float] = []

    def whole_model() -> None:
        whole.append(whole_pass.run(1)["s"])

    def measure(num_chunks: int) -> dict:
        gate()
        return chunk_costs.measure_chunks(config, num_chunks, (), micro_BL, mtp_weight=MTP_WEIGHT_STANDALONE,
                                          repeats=repeats, between=whole_model)

    out = {"chunks": {}, "balance": {}}
    for num_chunks in sorted({build_schedule(s, PP, microbatches).placement.num_chunks for s in SCHEDULES}):
        out["chunks"][num_chunks] = measure(num_chunks)
    per_layer = measure(NUM_LAYERS)
    out["layers"] = per_layer
    out["whole_micro_s"] = statistics.median(whole)
    for name in SCHEDULES:
        out["balance"][name] = chunk_costs.best_stage_layers(build_schedule(name, PP, microbatches), per_layer,
                                                             NUM_LAYERS)
    return out


def variants(balance: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(label, schedule, stage_layers): every schedule evenly cut, plus the simulator's balanced cuts worth it."""
    out = [(name, name, ()) for name in SCHEDULES]
    for name in SCHEDULES:
        choice = balance[name]
        if choice["predicted_gain"] >= BALANCE_MIN_GAIN and choice["best_stage_layers"] != choice["even_stage_layers"]:
            layers = tuple(choice["best_stage_layers"])
            out.append((f"{name} {list(layers)}", name, layers))
    return out


def measure(microbatches: int, steps: int, warmup: int, quick: bool) -> dict:
    from raymoe.bench import schedule_fit as fit
    from raymoe.parallel.topology import Topology
    from raymoe.runtime.driver import Driver
    from raymoe.runtime.worker_group import WorkerGroup
    from raymoe.train import ReferenceTrainer

    gate = Gate(quick)
    reference = ReferenceTrainer(config_for("1f1b", microbatches, steps + warmup))
    total_params = sum(p.numel() for p in reference.model.parameters())
    first = reference.batches.next_batch()
    alone = standalone(microbatches, first, gate, repeats=2 if quick else 5)
    gate()
    overhead = deferred_linear_overhead(reference.config, first[:1], repeats=2 if quick else 7, gate=gate)
    chosen = variants(alone["balance"])
    group = WorkerGroup(Topology(pp=PP), num_cpus_per_worker=1.0).start()
    drivers = {}
    try:
        for label, name, layers in chosen:
            drivers[label] = Driver(config_for(name, microbatches, steps + warmup, layers), worker_group=group).start()
        samples = {label: [] for label in drivers}
        ref_fb = []
        for step in range(steps + warmup):
            batch = first if step == 0 else reference.batches.next_batch()
            seen = gate()
            fb_s, opt_s = _reference_phases(reference, batch, microbatches)
            if step >= warmup:
                ref_fb.append({"s": fb_s, "opt_s": opt_s, "foreign": seen["foreign_cores"]})
            for label, driver in drivers.items():
                ref_seen = gate()
                ref_s = reference.step(batch)["step_time_s"]
                seen = gate()
                report = driver.step(batch)
                if step >= warmup:
                    samples[label].append(_sample(report, ref_s, fit.step_timeline(driver.schedule, report.results),
                                                  max(ref_seen["foreign_cores"], seen["foreign_cores"]),
                                                  driver.schedule.placement))
        params = {label: max(i.num_params for i in d.load_info) / total_params for label, d in drivers.items()}
    finally:
        for driver in drivers.values():
            driver.close()
        group.shutdown()
    one_worker = single_worker(reference, microbatches, steps, warmup, gate)
    ref_fb_s = statistics.median(x["s"] for x in ref_fb)
    ref_opt_s = statistics.median(x["opt_s"] for x in ref_fb)
    schedules = {}
    for label, name, layers in chosen:
        schedules[label] = summarize(name, layers, samples[label], ref_fb_s, ref_opt_s,
                                     _cut_costs(alone, name, layers, microbatches), microbatches, params[label])
    return {"microbatches": microbatches, "steps": steps, "warmup": warmup,
            "ref_fb_s": spread([x["s"] for x in ref_fb]),
            "ref_optimizer_s": spread([x["opt_s"] for x in ref_fb]), "standalone": _jsonable(alone),
            "single_worker": one_worker,
            "deferred_linear": overhead, "schedules": schedules,
            "foreign_cores": spread([g["foreign_cores"] for g in gate.seen]),
            "gate_gave_up": sum(not g["quiet"] for g in gate.seen),
            "gate_waited_s": sum(g["waited_s"] for g in gate.seen)}


def single_worker(reference, microbatches: int, steps: int, warmup: int, gate: Gate) -> dict:
    """The same micro-batches through one worker actor (pp=1), each step next to the reference's forward+backward:
    what the executor in a Ray actor costs with no pipeline around it (no peer, no second rank computing)."""
    from raymoe.parallel.topology import Topology
    from raymoe.runtime.driver import Driver
    from raymoe.runtime.worker_group import WorkerGroup

    group = WorkerGroup(Topology(pp=1), num_cpus_per_worker=1.0).start()
    ratios, kernel, faults = [], [], []
    try:
        driver = Driver(config_for("1f1b", microbatches, steps + warmup, pp=1), worker_group=group).start()
        try:
            for step in range(steps + warmup):
                batch = reference.batches.next_batch()
                gate()
                fb_s, _ = _reference_phases(reference, batch, microbatches)
                gate()
                (result,) = driver.step(batch).results
                if step >= warmup:
                    ratios.append(result.compute_s / fb_s)
                    kernel.append(result.cpu["sys_s"] / (result.cpu["user_s"] + result.cpu["sys_s"]))
                    faults.append(result.cpu["minor_faults"])
        finally:
            driver.close()
    finally:
        group.shutdown()
    return {"compute_excess": spread(ratios), "worker_kernel_share": statistics.median(kernel),
            "worker_minor_faults_per_step": statistics.median(faults)}


def _reference_phases(reference, batch: torch.Tensor, microbatches: int) -> tuple[float, float]:
    """The single-process step's two halves, timed apart: forward+backward of every micro-batch, then clipping
    and AdamW (an extra update of the reference's weights: harmless, only its timing is used)."""
    from raymoe.train.clip import clip_gradients

    fb_s = chunk_costs.whole_model_pass(reference.model, batch, microbatches, MTP_WEIGHT_STANDALONE)
    start = time.perf_counter()
    clip_gradients(reference.model.parameters(), reference.config.optim.grad_clip)
    reference.optimizer.step()
    optimizer_s = time.perf_counter() - start
    reference.optimizer.zero_grad(set_to_none=True)
    return fb_s, optimizer_s


def _sample(report, ref_s: float, timeline, foreign: float, placement) -> dict:
    results = report.results
    actions: dict[tuple[str, int], list] = {}  # (kind, chunk; an FB by its forward's) -> [seconds, count]
    for r in results:
        for t in r.timings:
            if t.kind in COMPUTE_KINDS:
                entry = actions.setdefault((t.kind, placement.info(t.stage).chunk), [0.0, 0])
                entry[0] += t.end_s - t.start_s
                entry[1] += 1
    return {
        "actions": actions,
        "step_s": report.wall_s, "ref_step_s": ref_s, "ratio": report.wall_s / ref_s,
        "compute_sum_s": sum(r.compute_s for r in results), "compute_max_s": max(r.compute_s for r in results),
        "optimizer_s": max(r.optimizer_s for r in results), "replica_sync_s": max(r.replica_sync_s for r in results),
        "recv_wait_max_s": max(r.recv_wait_s for r in results), "recv_wait_sum_s": sum(r.recv_wait_s for r in results),
        "driver_overhead_s": report.record["driver_overhead_s"], "worker_s": report.record["worker_step_s"],
        "makespan_s": timeline.makespan, "foreign_cores": foreign,
        "worker_user_s": sum(r.cpu["user_s"] for r in results), "worker_sys_s": sum(r.cpu["sys_s"] for r in results),
        "worker_minor_faults": sum(r.cpu["minor_faults"] for r in results),
    }


def _on_reference_footing(per_chunk: dict, ref_fb_per_micro_s: float) -> tuple[dict, float]:
    """Scale a cut's standalone costs so that its chunks' F + B add up to the single-process forward+backward of
    one micro-batch, measured in the paired steps: the ideal then spends exactly the reference's compute (compute
    excess 1 by definition), split over the chunks in the measured proportions. Standalone costs alone are no
    yardstick: back to back they ran 0.80 of the whole model, between whole-model runs 1.12, and the machine's
    speed drifts by 10-15% between the two measurements."""
    scale = ref_fb_per_micro_s / sum(v for (kind, _), v in per_chunk.items() if kind in ("F", "B"))
    return {k: v * scale for k, v in per_chunk.items()}, scale


def _cut_costs(alone: dict, schedule: str, layers: tuple[int, ...], microbatches: int) -> dict:
    """Per-chunk standalone costs of this variant's cut: measured for even cuts, summed from layers otherwise."""
    from raymoe.schedule import build_schedule

    num_chunks = build_schedule(schedule, PP, microbatches).placement.num_chunks
    if not layers:
        return alone["chunks"][num_chunks]
    return chunk_costs.chunk_costs_from_layers(alone["layers"], layers)


def summarize(schedule: str, layers, samples: list[dict], ref_fb_s: float, ref_opt: float, raw_chunk: dict,
              microbatches: int, param_share: float) -> dict:
    """``raw_chunk``: the cut's standalone costs as measured (``_cut_costs``)."""
    from raymoe.schedule import build_schedule

    def med(key: str) -> float:
        return statistics.median(s[key] for s in samples)

    step, ref_step = med("step_s"), med("ref_step_s")
    built = build_schedule(schedule, PP, microbatches)
    per_chunk, scale = _on_reference_footing(raw_chunk, ref_fb_s / microbatches)
    makespan = chunk_costs.ideal_makespan(built, per_chunk)
    apart = chunk_costs.schedule_costs(built, raw_chunk).per_chunk  # the chunks run apart, as measured (FB = F + B)
    over_apart = [_over_chunks_apart(s["actions"], apart) for s in samples]
    ideal_step = makespan + ref_opt * param_share
    parts = {
        "compute_excess": (med("compute_sum_s") - ref_fb_s) / PP,
        "optimizer_and_copy_sync": med("optimizer_s") - ref_opt * param_share,
        "waiting_on_receives": med("recv_wait_max_s"),
        "driver_overhead": med("driver_overhead_s"),
    }
    gap = step - ideal_step
    return {
        "schedule": schedule, "stage_layers": list(layers),
        "step_s": spread([s["step_s"] for s in samples]), "ref_step_s": spread([s["ref_step_s"] for s in samples]),
        "ratio": step / ref_step, "per_step_ratio": spread([s["ratio"] for s in samples]),
        "per_step_ratios": [s["ratio"] for s in samples],
        "ideal_makespan_s": makespan, "ideal_step_s": ideal_step, "ideal_ratio": ideal_step / ref_step,
        "standalone_scale": scale,
        "step_over_ideal": step / ideal_step,
        "makespan_s": spread([s["makespan_s"] for s in samples]),
        "compute_sum_s": med("compute_sum_s"), "compute_excess": med("compute_sum_s") / ref_fb_s,
        "compute_max_rank_s": med("compute_max_s"),
        "actions_over_chunks_apart": spread(over_apart),
        "optimizer_s": med("optimizer_s"), "ref_optimizer_s": ref_opt, "param_share_busiest_rank": param_share,
        "replica_sync_after_backward_s": med("replica_sync_s"),
        "recv_wait_max_rank_s": med("recv_wait_max_s"), "recv_wait_sum_s": med("recv_wait_sum_s"),
        "driver_overhead_s": med("driver_overhead_s"),
        "worker_kernel_share": med("worker_sys_s") / (med("worker_user_s") + med("worker_sys_s")),
        "worker_minor_faults_per_step": med("worker_minor_faults"),
        "gap_to_ideal_s": gap, "gap_parts_s": parts,
        "gap_shares": {k: (v / gap if gap > 0 else None) for k, v in parts.items()},
        "foreign_cores": spread([s["foreign_cores"] for s in samples]),
    }


def _over_chunks_apart(actions: dict[tuple[str, int], list], apart: dict[tuple[str, int], float]) -> float:
    """One step's compute actions (``_sample``'s (kind, chunk) -> [seconds, count]) over what the same actions
    cost as the chunks measured apart: 1 when the runtime adds nothing to the arithmetic of its chunks."""
    expected = sum(count * apart[key] for key, (_, count) in actions.items())
    return sum(seconds for seconds, _ in actions.values()) / expected


def _jsonable(alone: dict) -> dict:
    def costs(c: dict) -> dict:
        return {f"{kind}@{chunk}": v for (kind, chunk), v in c.items()}

    return {"chunks": {str(n): costs(c) for n, c in alone["chunks"].items()}, "layers": costs(alone["layers"]),
            "whole_micro_s": alone["whole_micro_s"], "balance": alone["balance"]}


def contention_alone(quick: bool) -> dict:
    """The same forward+backward here, in Ray actors and in plain processes, alone and two at once
    (``raymoe.bench.contention``): the compute excess a two-rank pipeline on Ray starts from."""
    from raymoe.train.batches import open_batches

    overrides = overrides_for("1f1b", MICROBATCHES[0], 1)
    micro_BL = open_batches(config_for("1f1b", MICROBATCHES[0], 1)).next_batch()[:1]
    return contention.measure(PRESET, overrides, micro_BL, mtp_weight=MTP_WEIGHT_STANDALONE,
                              rounds=CONTENTION_ROUNDS[quick], iterations=CONTENTION_ITERATIONS[quick],
                              gate=Gate(quick))


def order_alone(quick: bool, m: int) -> dict:
    """What the pipeline's compute costs before any runtime, in this process, one thread, on the first layout's
    ``m`` micro-batches (each ratio per round over the whole model on the same micro-batches, timed next to it):

    * ``in_turn``: the model cut into 2 and 4 chunks, each micro-batch's chunks one after the other
      (``chunk_costs.in_turn_over_whole``): what cutting alone costs, caches warm;
    * ``serial``: every schedule's real action lists, one action at a time (``schedule_order``): cutting plus
      the schedule's order."""
    from raymoe.bench import schedule_order
    from raymoe.train.batches import open_batches

    gate, rounds = Gate(quick), ORDER_ROUNDS[quick]
    batch = open_batches(config_for("1f1b", m, 1)).next_batch()
    out = {"microbatches": m, "rounds": rounds, "in_turn": {}, "serial": {}}
    for num_chunks in (2, 4):
        out["in_turn"][f"{num_chunks} chunks"] = spread(chunk_costs.in_turn_over_whole(
            config_for("1f1b", m, 1), num_chunks, batch, mtp_weight=MTP_WEIGHT_STANDALONE, rounds=rounds,
            before=gate))
    for name in SCHEDULES:
        out["serial"][name] = spread(schedule_order.compute_over_whole(
            config_for(name, m, 1), batch, mtp_weight=MTP_WEIGHT_STANDALONE, rounds=rounds, before=gate))
    return out


def run(out_dir: Path, *, quick: bool = False) -> dict:
    from raymoe.bench.pipeline_efficiency_report import markdown
    from raymoe.runtime.session import ray_session

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference is one process on one core, like each worker
    try:
        with ray_session():
            if quick:
                layouts = [measure(m, QUICK_STEPS, QUICK_WARMUP, quick=True) for m in QUICK_MICROBATCHES]
            else:
                layouts = [measure(m, STEPS, WARMUP, quick=False) for m in MICROBATCHES]
            processes = contention_alone(quick)
            order = order_alone(quick, layouts[0]["microbatches"])
    finally:
        torch.set_num_threads(threads)
    results = {"preset": PRESET, "num_layers": NUM_LAYERS, "pp": PP, "quick": quick, "load_threshold": LOAD_THRESHOLD,
               "machine": machine_load(), "layouts": layouts, "contention": processes, "order": order}
    results["markdown"] = markdown(results)
    write_results(out_dir, "pipeline_efficiency", results)
    return {"markdown": results["markdown"], "layouts": [
        {"microbatches": x["microbatches"], "ratios": {k: s["ratio"] for k, s in x["schedules"].items()},
         "ideal_ratios": {k: s["ideal_ratio"] for k, s in x["schedules"].items()},
         "compute_excess": {k: s["compute_excess"] for k, s in x["schedules"].items()}} for x in results["layouts"]]}
