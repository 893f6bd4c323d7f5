"""The Markdown summary of a run (``report.md``): numbers first, then the pictures, then what was skipped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median

from raymoe.report.timings import StepTimings


@dataclass(frozen=True, kw_only=True)
class PipelineSummary:
    step: int
    schedule: str
    pp: int
    num_microbatches: int
    measured: StepTimings
    simulated_makespan: float
    simulated_mean_bubble_fraction: float
    costs: str
    """The simulator's costs (measured mean seconds per kind), as text."""


@dataclass(frozen=True, kw_only=True)
class Summary:
    run_dir: str
    layout: str
    rows: Sequence[dict]
    torn_lines: int
    pipeline: PipelineSummary | None
    figures: dict[str, str]
    """Title -> file name (relative to the report)."""
    notes: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    """``events.jsonl``: checkpoints saved, stops, resumes, recoveries from worker failures."""


def _steady(values: list[float]) -> float:
    """Median over the steps after the first (the first step pays for warm-up and lazy initialisation)."""
    values = values[1:] or values
    return median(values) if values else float("nan")


def to_markdown(summary: Summary) -> str:
    rows = summary.rows
    first, last = rows[0], rows[-1]
    lines = [f"# raymoe run report: `{summary.run_dir}`", "", summary.layout, ""]
    lines += [
        "| metric | first step | last step | best / steady |",
        "|---|---|---|---|",
        f"| loss | {first['loss']:.4f} | {last['loss']:.4f} | min {min(r['loss'] for r in rows):.4f} |",
    ]
    if "mtp_loss" in last:
        lines.append(f"| MTP loss | {first['mtp_loss']:.4f} | {last['mtp_loss']:.4f} | "
                     f"min {min(r['mtp_loss'] for r in rows):.4f} |")
    if "max_vio" in last:
        lines.append(f"| MaxVio (mean over MoE layers) | {first['max_vio']:.3f} | {last['max_vio']:.3f} | "
                     f"min {min(r['max_vio'] for r in rows):.3f} |")
    if "tokens_per_s" in last:
        lines.append(f"| tokens/s | {first['tokens_per_s']:.0f} | {last['tokens_per_s']:.0f} | "
                     f"median {_steady([r['tokens_per_s'] for r in rows]):.0f} |")
    if "step_time_s" in last:
        lines.append(f"| step time (s) | {first['step_time_s']:.3f} | {last['step_time_s']:.3f} | "
                     f"median {_steady([r['step_time_s'] for r in rows]):.3f} |")
    lines += ["", f"{len(rows)} steps (steps {first['step']}..{last['step']})"
              + (f"; {summary.torn_lines} torn line(s) skipped (the run was stopped mid-write)"
                 if summary.torn_lines else "") + "."]
    if summary.pipeline is not None:
        p, m = summary.pipeline, summary.pipeline.measured
        lines += ["", "## Pipeline", "",
                  f"Schedule {p.schedule}, pp={p.pp}, {p.num_microbatches} micro-batches; step {p.step}.", "",
                  "| | makespan (s) | mean bubble |", "|---|---|---|",
                  f"| measured | {m.makespan:.4f} | {m.mean_bubble_fraction:.1%} |",
                  f"| simulated ({p.costs}) | {p.simulated_makespan:.4f} | "
                  f"{p.simulated_mean_bubble_fraction:.1%} |", "",
                  "Per rank (measured): " + ", ".join(f"rank {r}: busy {m.busy[r]:.4f} s, bubble {b:.1%}"
                                                     for r, b in m.bubble_fraction.items()) + ".", "",
                  "The simulation gives every stage the same mean cost per kind; real stages differ (the first "
                  "holds the embedding, the last the output head and MTP), and the measured timeline also "
                  "includes waits for activations and gradients, so the measured makespan is the longer one."]
    if summary.events:
        lines += ["", "## Checkpoints and events", "", "| event | step | details |", "|---|---|---|"]
        lines += [f"| {e.get('event', '?')} | {_event_step(e)} | {_event_details(e)} |" for e in summary.events]
    lines += ["", "## Figures", ""]
    for title, name in summary.figures.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    if summary.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary.notes] + [""]
    return "\n".join(lines)


def _event_step(event: dict) -> str:
    if event.get("event") == "recovered":
        return f"{event.get('failed_at_step')} -> {event.get('resumed_at_step')}"
    return str(event.get("step", ""))


def _event_details(event: dict) -> str:
    kind = event.get("event")
    if kind == "checkpoint":
        return f"{event.get('bytes', 0) / 2**20:.1f} MiB in {event.get('seconds', 0):.2f} s: `{event.get('path')}`"
    if kind == "stopped":
        return f"by {event.get('signal')}"
    if kind == "resumed":
        return f"from `{event.get('checkpoint')}`"
    if kind == "recovered":
        source = event.get("checkpoint") or "the start"
        return f"{event.get('error', '')[:120]}; new workers from `{source}` in {event.get('seconds', 0):.1f} s"
    return ""
