"""``raymoe prepare-data SRC... --out DIR``: tokenize text files into a Parquet token dataset.

``raymoe prepare-data --embedded`` builds (or finds) the default corpus in the cache and prints its path;
with ``--out DIR`` it writes that corpus to DIR instead. See ``docs/data.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("prepare-data")
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Dataset directory to write.")
@click.option(
    "--glob",
    "patterns",
    multiple=True,
    default=("*.txt",),
    show_default=True,
    help="File pattern to take from directory sources (repeatable), e.g. --glob '*.py' --glob '*.md'.",
)
@click.option("--shard-tokens", type=click.IntRange(min=1), default=None, help="Tokens per shard [4194304].")
@click.option("--skip-binary", is_flag=True, help="Skip binary or non-UTF-8 files instead of failing.")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it already holds something.")
@click.option("--embedded", is_flag=True, help="Prepare the embedded stdlib corpus instead of SOURCES.")
@click.option(
    "--byte-budget", type=click.IntRange(min=1), default=None, help="Embedded corpus size in bytes."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare_data(
    sources: tuple[Path, ...],
    out_dir: Path | None,
    patterns: tuple[str, ...],
    shard_tokens: int | None,
    skip_binary: bool,
    overwrite: bool,
    embedded: bool,
    byte_budget: int | None,
    quiet: bool,
) -> None:
    """Tokenize text SOURCES (files or directories) into Parquet shards plus a manifest in --out DIR."""
    from raymoe import data

    started = time.perf_counter()
    try:
        if embedded:
            if sources:
                raise click.UsageError("--embedded takes no SOURCES")
            budget = byte_budget or data.DEFAULT_BYTE_BUDGET
            if out_dir is None:
                out_dir = data.embedded_dataset(byte_budget=budget, progress=not quiet)
                info = data.read_manifest(out_dir)
            else:
                info = data.build_embedded_corpus(
                    out_dir, byte_budget=budget, overwrite=overwrite, progress=not quiet
                )
        else:
            if out_dir is None:
                raise click.UsageError("--out DIR is required (or use --embedded)")
            info = data.prepare_data(
                sources,
                out_dir,
                shard_tokens=shard_tokens or data.DEFAULT_SHARD_TOKENS,
                patterns=patterns,
                on_binary="skip" if skip_binary else "raise",
                overwrite=overwrite,
                progress=not quiet,
            )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_summary(info, time.perf_counter() - started)


def _print_summary(info, seconds: float) -> None:
    total_bytes = sum(s.num_bytes for s in info.shards)
    click.echo(
        f"{info.path}: {info.num_documents:,} documents, {info.num_tokens:,} tokens "
        f"({info.tokenizer} tokenizer, vocab {info.vocab_size}) in {len(info.shards)} shard(s), "
        f"{total_bytes / 1e6:.2f} MB on disk, {seconds:.2f} s"
    )
    for shard in info.shards:
        click.echo(
            f"  {shard.file}  {shard.num_documents:,} docs  {shard.num_tokens:,} tokens  "
            f"{shard.num_bytes / 1e6:.2f} MB  sha256 {shard.sha256[:12]}"
        )
