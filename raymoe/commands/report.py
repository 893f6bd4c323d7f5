"""``raymoe report RUN_DIR``: PNG plots and a Markdown summary of a run.

python -m raymoe report runs/debug                  # writes runs/debug/report/{loss,throughput,...}.png + report.md
python -m raymoe report runs/debug --out /tmp/rep   # somewhere else
python -m raymoe report runs/debug --step 5         # timeline of step 5 instead of the last logged step
"""

from __future__ import annotations

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", default=None, help="Where to write the report [default: RUN_DIR/report].")
@click.option("--step", type=int, default=None, help="Step of the pipeline timeline [default: last logged].")
def report(run_dir: str, out_dir: str | None, step: int | None) -> None:
    """Write loss, throughput, expert-balance and pipeline-timeline plots plus report.md for RUN_DIR."""
    from raymoe.report import write_report

    try:
        result = write_report(run_dir, out_dir=out_dir, step=step)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    for title, path in result.figures.items():
        click.echo(f"{title}: {path}")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"summary: {result.summary_path}")
