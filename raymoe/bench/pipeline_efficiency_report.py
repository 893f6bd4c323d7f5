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
        "driver s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in layout["schedules"].items():
        lines.append(
            f"| {label} | {_spread(s['step_s'])} | {_f(s['ref_step_s']['median'], 3)} | **{_f(s['ratio'])}** | "
            f"{_spread(s['per_step_ratio'], 2)} | {_f(s['ideal_ratio'])} | {_f(s['step_over_ideal'])} | "
            f"{_f(s['compute_excess'])} | {_f(s['optimizer_s'], 3)} ({_f(s['ref_optimizer_s'], 3)} x "
            f"{_f(s['param_share_busiest_rank'])}) | {_f(s['replica_sync_after_backward_s'], 3)} | "
            f"{_f(s['recv_wait_max_rank_s'], 3)} | {_f(s['driver_overhead_s'], 3)} |"
        )
    return lines


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
        lines += deferred_table(layout) + [""]
        fc = layout["foreign_cores"]
        lines.append(
            f"_{results['preset']} preset, {results['num_layers']} layers, pp={results['pp']}, dp=1, "
            f"{layout['microbatches']} micro-batches of 1 x 128 tokens, fp32; {layout['steps']} counted steps per "
            f"schedule ({layout['warmup']} warm-up), each right after a single-process step on the same batch; "
            f"single-process forward+backward {layout['ref_fb_s']['median']:.3f} s. Foreign load before timed calls "
            f"{fc['min']:.2f}-{fc['max']:.2f} cores (gate {results['load_threshold']}; gave up waiting "
            f"{layout['gate_gave_up']} times, waited {layout['gate_waited_s']:.0f} s); load average at the end "
            f"{results['machine']['loadavg_1m']:.1f} on {results['machine']['cpus']} CPUs._")
    return "\n".join(lines)
