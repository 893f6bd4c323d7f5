"""``write_report(run_dir)``: every picture and the Markdown summary of a run directory, from its files alone.

Inputs (what trainers write; see records.py):

    metrics.jsonl   one StepMetrics record per step (raymoe/train/metrics.py); required
    config.yaml     the resolved config; needed for router labels and the simulated timeline
    actions.jsonl   measured compute actions (report/timings.py TimedAction); optional

Outputs, in ``RUN_DIR/report/`` unless ``out_dir`` says otherwise (the trainer's own loss.png stays):
loss.png (main and MTP loss), throughput.png (tokens/s and step time), expert_balance.png (MaxVio heat map
per router over time, last-step load per expert), timeline.png (measured vs simulated pipeline timeline of
one step) and report.md. A figure whose inputs are missing is skipped with a note in report.md rather than
failing the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raymoe.report import plots
from raymoe.report.records import (
    ACTIONS_FILE,
    METRICS_FILE,
    iter_actions,
    read_config,
    read_jsonl,
    router_names,
)
from raymoe.report.summary import PipelineSummary, Summary, to_markdown
from raymoe.report.timings import (
    COMPUTE_KINDS,
    TimedAction,
    group_by_step,
    mean_durations,
    simulated_costs,
    step_timings,
)

REPORT_FILE = "report.md"
REPORT_DIR = "report"


@dataclass(frozen=True, kw_only=True)
class Report:
    summary_path: Path
    figures: dict[str, Path]
    notes: list[str]


def _layout(config) -> str:
    if config is None:
        return "No config.yaml: layout unknown."
    p, s = config.parallel, config.schedule
    return (f"Layout pp={p.pp} x ep={p.ep} x dp={p.dp} on {p.device} ({p.world_size} workers), schedule "
            f"{s.name} with {s.num_microbatches} micro-batches, ZeRO-{p.zero_stage}; "
            f"{config.model.num_layers} layers, {config.model.num_routed_experts} routed experts, "
            f"global batch {config.data.batch_size} x {config.data.seq_len} tokens.")


def _pipeline(actions: list[TimedAction], config, step: int | None, out: Path,
              notes: list[str]) -> tuple[PipelineSummary | None, Path | None]:
    by_step = group_by_step(a for a in actions if a.kind in COMPUTE_KINDS)
    if not by_step:
        notes.append(f"{ACTIONS_FILE} holds no compute actions: no timeline.")
        return None, None
    if step is None:
        step = max(by_step)  # the last logged step: warm caches, no first-step initialisation
    if step not in by_step:
        raise ValueError(f"step {step} is not in {ACTIONS_FILE}; it has steps {sorted(by_step)}")
    measured = by_step[step]
    if config is None:
        notes.append("No config.yaml: the schedule is unknown, so the timeline is not simulated or drawn.")
        return None, None
    from raymoe.schedule import Costs, build_schedule, simulate

    p, s = config.parallel, config.schedule
    schedule = build_schedule(s.name, p.pp, s.num_microbatches)
    timings = step_timings(measured, ranks=range(p.pp))
    if sorted(timings.busy) != list(range(p.pp)):
        notes.append(f"{ACTIONS_FILE} names ranks {sorted(timings.busy)}, the config has pp={p.pp}: no timeline.")
        return None, None
    # Simulate with the mean cost of each kind over all logged steps after the first (warm-up excluded).
    warm = [a for st, acts in by_step.items() if st != min(by_step) or len(by_step) == 1 for a in acts]
    means = mean_durations(warm)
    costs = Costs(**simulated_costs(means))
    sim = simulate(schedule, costs)
    sim_bubble = sim.mean_bubble / sim.makespan if sim.makespan > 0 else 0.0
    path = plots.plot_timelines(
        measured, sim, schedule, out / "timeline.png", step=step, bubble=timings.mean_bubble_fraction,
        title=f"{s.name}, pp={p.pp}, {s.num_microbatches} micro-batches",
    )
    summary = PipelineSummary(step=step, schedule=s.name, pp=p.pp, num_microbatches=s.num_microbatches,
                              measured=timings, simulated_makespan=sim.makespan,
                              simulated_mean_bubble_fraction=sim_bubble, costs=plots.format_costs(costs, set(means)))
    return summary, path


def write_report(run_dir: str | Path, *, out_dir: str | Path | None = None, step: int | None = None) -> Report:
    """Write the pictures and report.md of ``run_dir``; ``step`` picks the timeline's step (default: last)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ValueError(f"{run_dir} has no {METRICS_FILE}: is it a raymoe run directory?")
    metrics = read_jsonl(metrics_path)
    rows = [r for r in metrics.rows if "step" in r and "loss" in r]
    if not rows:
        raise ValueError(f"{metrics_path} holds no complete step record")
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    config = read_config(run_dir)
    notes: list[str] = []
    figures = {"Loss and MTP loss": plots.plot_losses(rows, out / "loss.png"),
               "Throughput": plots.plot_throughput(rows, out / "throughput.png")}
    balance_rows = [r for r in rows if r.get("expert_load")]
    if balance_rows:
        labels = router_names(config, len(balance_rows[-1]["expert_load"]))
        figures["Expert load balance (MaxVio per router over time)"] = plots.plot_expert_balance(
            balance_rows, labels, out / "expert_balance.png")
    else:
        notes.append("No expert_load in metrics.jsonl (a dense model?): no MaxVio heat map.")
    pipeline = None
    actions_path = run_dir / ACTIONS_FILE
    if actions_path.is_file():
        actions_rows = read_jsonl(actions_path)
        pipeline, path = _pipeline(list(iter_actions(actions_rows.rows)), config, step, out, notes)
        if path is not None:
            figures["Pipeline timeline: measured vs simulated"] = path
    else:
        notes.append(f"No {ACTIONS_FILE} in the run directory (the single-process trainer and runs without "
                     "action timing write none): the measured vs simulated timeline is skipped.")
    events_path = run_dir / "events.jsonl"
    events = read_jsonl(events_path).rows if events_path.is_file() else []
    summary = Summary(run_dir=str(run_dir), layout=_layout(config), rows=rows, torn_lines=metrics.torn,
                      pipeline=pipeline, figures={t: p.name for t, p in figures.items()}, notes=notes,
                      events=events)
    summary_path = out / REPORT_FILE
    summary_path.write_text(to_markdown(summary))
    return Report(summary_path=summary_path, figures=figures, notes=notes)
