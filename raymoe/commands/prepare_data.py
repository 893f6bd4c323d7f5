"""``raymoe prepare-data SRC... --out DIR``: tokenize a corpus into a Parquet token dataset.

Inputs are text files (default), JSONL (``--field NAME``) or Parquet (``--column NAME``); ``--tokenizer
DIR_OR_FILE`` selects a ``tokenizer.json`` (default: bytes); ``--holdout F`` also writes ``DIR/holdout/``.
``--engine ray`` runs on Ray Data (``--address`` joins a cluster), ``local`` in this process; both write the
same bytes, and ``auto`` picks Ray for a cluster address or large inputs. ``raymoe prepare-data --embedded``
builds (or finds) the default corpus in the cache and prints its path; with ``--out DIR`` it writes that corpus
to DIR instead. See ``docs/data.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

AUTO_RAY_BYTES = 64 << 20  # below this, starting Ray costs more than it saves


@click.command("prepare-data")
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Dataset directory to write.")
@click.option("--glob", "patterns", multiple=True,
              help="File pattern for directory sources (repeatable) [*.txt; *.jsonl with --field; *.parquet with "
                   "--column], e.g. --glob '*.py' --glob '*.md'.")
@click.option("--field", default=None, help="SOURCES are JSONL: each record's FIELD is a document.")
@click.option("--column", default=None, help="SOURCES are Parquet: each row's string COLUMN is a document.")
@click.option("--tokenizer", "tokenizer_path", default="", help="tokenizer.json file or a directory holding one "
              "(`raymoe train-tokenizer`, or a published model's); default: the byte tokenizer.")
@click.option("--bos-token", default=None, help="Name of the BOS special token, if --tokenizer's is unusual.")
@click.option("--eos-token", default=None, help="Name of the EOS special token, if --tokenizer's is unusual.")
@click.option("--holdout", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0,
              help="Fraction of documents (by a hash of their name) written to DIR/holdout/ instead.")
@click.option("--engine", type=click.Choice(["auto", "ray", "local"]), default="auto", show_default=True,
              help="ray: Ray Data; local: this process; auto: ray with --address or for >= 64 MiB of input.")
@click.option("--address", default="", help="Ray cluster to join (e.g. auto); implies --engine ray.")
@click.option("--blocks", type=click.IntRange(min=1), default=None, help="Ray Data read blocks (default: Ray's).")
@click.option("--shard-tokens", type=click.IntRange(min=1), default=None, help="Tokens per shard [4194304].")
@click.option("--row-group-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens per Parquet row group, the lazy loader's read unit [65536].")
@click.option("--skip-binary", is_flag=True, help="Skip binary or non-UTF-8 files instead of failing.")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it already holds something.")
@click.option("--embedded", is_flag=True, help="Prepare the embedded stdlib corpus instead of SOURCES.")
@click.option("--byte-budget", type=click.IntRange(min=1), default=None, help="Embedded corpus size in bytes.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare_data(sources: tuple[Path, ...], out_dir: Path | None, embedded: bool, byte_budget: int | None,
                 overwrite: bool, quiet: bool, **options) -> None:
    """Tokenize SOURCES (files or directories) into Parquet shards plus a manifest in --out DIR."""
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
                info = data.build_embedded_corpus(out_dir, byte_budget=budget, overwrite=overwrite,
                                                  progress=not quiet)
        else:
            if out_dir is None:
                raise click.UsageError("--out DIR is required (or use --embedded)")
            info = _prepare(sources, out_dir, overwrite=overwrite, progress=not quiet, **options)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_summary(info, time.perf_counter() - started)


def _prepare(sources, out_dir, *, tokenizer_path, bos_token, eos_token, engine, address, blocks, shard_tokens,
             row_group_tokens, skip_binary, patterns, **common):
    from raymoe import data
    from raymoe.data.shards import DEFAULT_ROW_GROUP_TOKENS

    common.update(
        tokenizer=data.load_tokenizer(tokenizer_path, bos=bos_token, eos=eos_token),
        patterns=patterns or None,
        shard_tokens=shard_tokens or data.DEFAULT_SHARD_TOKENS,
        row_group_tokens=row_group_tokens or DEFAULT_ROW_GROUP_TOKENS,
        on_binary="skip" if skip_binary else "raise",
    )
    if _use_ray(engine, address, sources):
        from raymoe.runtime.data_prep import prepare_data_ray

        return prepare_data_ray(sources, out_dir, address=address, num_blocks=blocks, **common)
    if address or blocks:
        raise click.UsageError("--address and --blocks need --engine ray (or auto)")
    return data.prepare_data(sources, out_dir, **common)


def _use_ray(engine: str, address: str, sources) -> bool:
    if engine != "auto":
        return engine == "ray"
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    total = 0
    for source in map(Path, sources):
        if source.is_file():
            total += source.stat().st_size
        elif source.is_dir():
            total += sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
        if total >= AUTO_RAY_BYTES:
            return True
    return False


def _print_summary(info, seconds: float) -> None:
    total_bytes = sum(s.num_bytes for s in info.shards)
    tok = info.tokenizer
    click.echo(
        f"{info.path}: {info.num_documents:,} documents, {info.num_tokens:,} tokens "
        f"({tok.name} tokenizer, vocab {tok.vocab_size}) in {len(info.shards)} shard(s), "
        f"{total_bytes / 1e6:.2f} MB on disk, {seconds:.2f} s, {info.num_tokens / max(seconds, 1e-9):,.0f} tokens/s"
    )
    for shard in info.shards:
        click.echo(
            f"  {shard.file}  {shard.num_documents:,} docs  {shard.num_tokens:,} tokens  "
            f"{shard.num_bytes / 1e6:.2f} MB  sha256 {shard.sha256[:12]}"
        )
    if info.holdout is not None:
        from raymoe.data import read_manifest

        held = read_manifest(info.path / info.holdout.dir)
        click.echo(f"  {info.holdout.dir}/  {held.num_documents:,} docs  {held.num_tokens:,} tokens  "
                   f"(held out: {info.holdout.fraction:g} of documents by name hash)")
