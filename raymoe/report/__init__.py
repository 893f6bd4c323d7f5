"""Run reports: pictures and a Markdown summary written from a run directory's files.

    from raymoe.report import write_report
    report = write_report("runs/debug")        # or: python -m raymoe report runs/debug
    report.summary_path, report.figures

Everything is computed from what the run left on disk (metrics.jsonl, config.yaml, actions.jsonl), so a report
works for a finished run, a stopped job and a run copied off a cluster alike. ``timings.py`` also gives the
runtime's metrics exporter its measured bubble fraction, so the dashboard and the report agree.
"""

from raymoe.report.build import REPORT_FILE, Report, write_report
from raymoe.report.records import ACTIONS_FILE, METRICS_FILE, read_jsonl, router_names
from raymoe.report.timings import (
    COMPUTE_KINDS,
    StepTimings,
    TimedAction,
    mean_durations,
    simulated_costs,
    step_timings,
)

__all__ = [
    "ACTIONS_FILE",
    "COMPUTE_KINDS",
    "METRICS_FILE",
    "REPORT_FILE",
    "Report",
    "StepTimings",
    "TimedAction",
    "mean_durations",
    "read_jsonl",
    "router_names",
    "simulated_costs",
    "step_timings",
    "write_report",
]
