"""Markdown tables of the pipeline-efficiency benchmark (``pipeline_efficiency.py``): the README's numbers."""

from __future__ import annotations


def _f(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _spread(s: dict, digits: int = 3) -> str:
    return f"{_f(s['min'], digits)} / {_f(s['median'], digits)} / {_f(s['max'], digits)}"


def schedule_table(layout: dict) -> list[str]:
    lines = [
        "| schedule | step s (min / med / max) | single-process step s | pipeline / single (med/med) | per-step "
        "ratio (min / med / max) | ideal (simulator, standalone costs) | step / ideal | compute excess | "
        "optimizer + copy sync s (single-process optimizer s x share) | copy sum exposed s | recv wait s (max rank) | "
        "driver s | workers' kernel time share | minor faults / step | actions / chunks run apart (min / med / max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in layout["schedules"].items():
        lines.append(
            f"| {label} | {_spread(s['step_s'])} | {_f(s['ref_step_s']['median'], 3)} | **{_f(s['ratio'])}** | "
            f"{_spread(s['per_step_ratio'], 2)} | {_f(s['ideal_ratio'])} | {_f(s['step_over_ideal'])} | "
            f"{_f(s['compute_excess'])} | {_f(s['optimizer_s'], 3)} ({_f(s['ref_optimizer_s'], 3)} x "
            f"{_f(s['param_share_busiest_rank'])}) | {_f(s['replica_sync_after_backward_s'], 3)} | "
            f"{_f(s['recv_wait_max_rank_s'], 3)} | {_f(s['driver_overhead_s'], 3)} | "
            f"{100 * s['worker_kernel_share']:.1f}% | {s['worker_minor_faults_per_step']:.0f} | "
            f"{_spread(s['actions_over_chunks_apart'], 2)} |"
        )
    return lines


def cold_chunk_factors(standalone: dict) -> dict[str, float]:
    """Per cut: its chunks' F + B, each timed right after a whole-model pass, over that whole-model pass."""
    whole = standalone["whole_micro_s"]
    cuts = {f"{n} chunks": costs for n, costs in standalone["chunks"].items()}
    cuts[f"{len({k.partition('@')[2] for k in standalone['layers']})} single layers"] = standalone["layers"]
    return {cut: sum(v for k, v in costs.items() if k[0] in "FB") / whole for cut, costs in cuts.items()}


def compute_excess_lines(layout: dict, results: dict) -> list[str]:
    """Where the compute excess comes from: chunks run apart (cold caches), one worker alone (pp=1), and the same
    work in other processes."""
    one = layout["single_worker"]
    cold = ", ".join(f"{f:.2f} ({cut})" for cut, f in cold_chunk_factors(layout["standalone"]).items())
    lines = [f"Chunks run apart: each chunk's F and B timed right after a whole-model forward+backward (as in a "
             f"pipeline, where a micro-batch's backward comes long after its forward and other chunks ran between) "
             f"add up to {cold} of that whole-model pass on the same micro-batch.",
             f"Compute excess of one worker alone (pp=1, same micro-batches, paired with the single-process step): "
             f"{_spread(one['compute_excess'], 2)} (min / med / max), kernel time "
             f"{100 * one['worker_kernel_share']:.1f}%, {one['worker_minor_faults_per_step']:.0f} minor faults "
             "per step."]
    order = results.get("order")
    if order and order["microbatches"] == layout["microbatches"]:
        lines += order_lines(order)
    contention = results.get("contention")
    if contention:
        cases = contention["cases"]
        lines.append(f"The same forward+backward in two Ray actors at once takes {cases['two_actors']['ratio']:.2f}x "
                     f"its time in this process ({cases['actor']['ratio']:.2f}x in one actor alone; plain processes: "
                     f"{cases['process']['ratio']:.2f}x alone, {cases['two_processes']['ratio']:.2f}x two at once).")
    return lines


def order_lines(order: dict) -> list[str]:
    """Before any runtime, in one process: cutting (warm), then the schedule's order."""
    in_turn = ", ".join(f"{_spread(v, 2)} ({cut})" for cut, v in order["in_turn"].items())
    serial = ", ".join(f"{_spread(v, 2)} ({name})" for name, v in order["serial"].items())
    return [f"Before any runtime, one process, one thread, over the whole model on the same {order['microbatches']} "
            f"micro-batches (min / med / max of {order['rounds']} paired rounds): the model cut into chunks, each "
            f"micro-batch's chunks one after the other (caches warm): {in_turn}; every rank's action list run one "
            f"action at a time in its schedule's order: {serial}."]


def gap_table(layout: dict) -> list[str]:
    lines = ["| schedule | step - ideal s | compute excess / pp | optimizer + copy sync over ideal | waiting on "
             "receives | driver | rest |", "|---|---|---|---|---|---|---|"]
    for label, s in layout["schedules"].items():
        parts = s["gap_parts_s"]
        rest = s["gap_to_ideal_s"] - sum(parts.values())
        cells = " | ".join(f"{v:.3f}" for v in parts.values())
        lines.append(f"| {label} | {s['gap_to_ideal_s']:.3f} | {cells} | {rest:.3f} |")
    return lines


def balance_table(layout: dict) -> list[str]:
    lines = ["| schedule | even cut | simulated makespan s | simulator's best cut | simulated makespan s | "
             "predicted gain |", "|---|---|---|---|---|---|"]
    for name, b in layout["standalone"]["balance"].items():
        lines.append(f"| {name} | {b['even_stage_layers']} | {b['even_makespan_s']:.3f} | {b['best_stage_layers']} "
                     f"| {b['best_makespan_s']:.3f} | {100 * b['predicted_gain']:.1f}% |")
    return lines


def deferred_table(layout: dict) -> list[str]:
    d = layout["deferred_linear"]
    ratio, sec = d["ratio_to_nn_linear"], d["seconds"]
    return ["| whole-model forward+backward, 1 x 128 tokens | seconds (median) | / nn.Linear |", "|---|---|---|"] + [
        f"| {name} | {sec[name]:.4f} | {ratio[name]:.3f} |" for name in sec]


def markdown(results: dict) -> str:
    lines = []
    for layout in results["layouts"]:
        lines += schedule_table(layout) + [""] + gap_table(layout) + [""] + balance_table(layout) + [""]
        lines += deferred_table(layout) + [""] + compute_excess_lines(layout, results) + [""]
        fc = layout["foreign_cores"]
        scales = ", ".join(f"{s['standalone_scale']:.2f}" for s in layout["schedules"].values())
        lines.append(
            f"_{results['preset']} preset, {results['num_layers']} layers, pp={results['pp']}, dp=1, "
            f"{layout['microbatches']} micro-batches of 1 x 128 tokens, fp32; {layout['steps']} counted steps per "
            f"schedule ({layout['warmup']} warm-up), each right after a single-process step on the same batch; "
            f"single-process forward+backward {layout['ref_fb_s']['median']:.3f} s. Foreign load before timed calls "
            f"{fc['min']:.2f}-{fc['max']:.2f} cores (gate {results['load_threshold']}; gave up waiting "
            f"{layout['gate_gave_up']} times, waited {layout['gate_waited_s']:.0f} s); load average at the end "
            f"{results['machine']['loadavg_1m']:.1f} on {results['machine']['cpus']} CPUs. The ideal's chunk costs "
            f"are the standalone ones scaled by {scales} so that each cut's F + B add up to the single-process "
            f"forward+backward per micro-batch._")
        lines.append("")
    if results.get("contention"):
        from raymoe.bench.contention import table

        c = results["contention"]
        lines += table(c) + ["", f"_{c['rounds']} rounds of {c['iterations']} repeats per case, cases alternating._"]
    return "\n".join(lines)
