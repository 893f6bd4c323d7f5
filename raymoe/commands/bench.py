"""``raymoe bench``: run the benchmarks and write their results next to a summary."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import click


@click.command()
@click.option("--out", "out_dir", default="benchmarks/results", show_default=True, type=click.Path())
@click.option("--only", multiple=True, help="Run only these benchmarks (repeatable).")
@click.option("--quick", is_flag=True, help="Fewer steps: a smoke run of every benchmark.")
@click.option("--tiny", is_flag=True, help="Toy shapes (the gpu benchmark only; automatic there without CUDA).")
def bench(out_dir: str, only: tuple[str, ...], quick: bool, tiny: bool) -> None:
    """Run benchmarks; results go to OUT/<name>.json and OUT/SUMMARY.md."""
    from raymoe.bench import BENCHMARKS, TINY_CAPABLE
    from raymoe.bench.load import machine_load

    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise click.BadParameter(
            f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}", param_hint="--only"
        )
    if tiny and (not only or set(only) - TINY_CAPABLE):
        raise click.BadParameter(
            f"--tiny applies only to {sorted(TINY_CAPABLE)}; got --only {sorted(only) or 'all'}", param_hint="--tiny"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, module_name in BENCHMARKS.items():
        if only and name not in only:
            continue
        click.echo(f"== {name}")
        start = time.perf_counter()
        options = {"tiny": True} if tiny else {}
        summary = importlib.import_module(module_name).run(out, quick=quick, **options)
        summary = {**summary, "wall_s": time.perf_counter() - start, "load_at_start": machine_load()}
        (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_summary(out)
    click.echo(f"wrote {out / 'SUMMARY.md'}")


def write_summary(out: Path) -> None:
    """SUMMARY.md from every benchmark's latest results in OUT (so ``--only`` keeps the others)."""
    sections = []
    for path in sorted(out.glob("*.summary.json")):
        summary = json.loads(path.read_text())
        name = path.name.removesuffix(".summary.json")
        sections.append(
            f"## {name}\n\n{summary.get('markdown', '')}\n\n_wall time {summary['wall_s']:.0f} s; "
            f"load at start {summary['load_at_start']}_\n"
        )
    (out / "SUMMARY.md").write_text("# raymoe benchmark results\n\n" + "\n".join(sections))
