"""``raymoe train-tokenizer SOURCES... --vocab-size N --out DIR``: learn a byte-level BPE, write ``tokenizer.json``.

SOURCES are read exactly as ``prepare-data`` reads them (text files, JSONL with ``--field``, Parquet with
``--column``); ``--embedded`` learns from the embedded stdlib corpus instead. The result is a standard Hugging
Face ``tokenizer.json`` that ``prepare-data --tokenizer DIR`` (or any ``tokenizers``-based tool) uses. See
``docs/data.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("train-tokenizer")
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--vocab-size", type=click.IntRange(min=1), required=True,
              help="Ids in the vocabulary (specials included).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Directory for tokenizer.json.")
@click.option("--glob", "patterns", multiple=True, help="File pattern for directory sources (repeatable).")
@click.option("--field", default=None, help="SOURCES are JSONL; take each record's FIELD as a document.")
@click.option("--column", default=None, help="SOURCES are Parquet; take COLUMN of each row as a document.")
@click.option("--embedded", is_flag=True, help="Learn from the embedded stdlib corpus instead of SOURCES.")
@click.option("--min-frequency", type=click.IntRange(min=1), default=2, show_default=True,
              help="Merge only pairs seen at least this often.")
@click.option("--skip-binary", is_flag=True, help="Skip binary or non-UTF-8 text files instead of failing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_tokenizer(
    sources: tuple[Path, ...], vocab_size: int, out_dir: Path, patterns: tuple[str, ...], field: str | None,
    column: str | None, embedded: bool, min_frequency: int, skip_binary: bool, quiet: bool,
) -> None:
    """Train a byte-level BPE tokenizer with VOCAB_SIZE ids on SOURCES; write OUT/tokenizer.json."""
    from raymoe.data import bpe, corpus
    from raymoe.data import sources as inputs

    started = time.perf_counter()
    try:
        if embedded:
            if sources:
                raise click.UsageError("--embedded takes no SOURCES")
            texts = corpus.embedded_texts()
        else:
            fmt = inputs.input_format(field, column)
            files = inputs.find_input_files(sources, patterns or inputs.DEFAULT_PATTERNS[fmt])
            documents = inputs.read_documents(files, fmt, on_binary="skip" if skip_binary else "raise",
                                              field=field or "", column=column or "")
            texts = (text for _, text in documents)
        tokenizer = bpe.train_bpe(texts, vocab_size, min_frequency=min_frequency, progress=not quiet)
        file = bpe.save_tokenizer(tokenizer, out_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    info = tokenizer.info
    click.echo(f"{file}: {info.name}, vocab {info.vocab_size} (bos {info.bos_id}, eos {info.eos_id}, pad "
               f"{info.pad_id}), sha256 {info.sha256[:12]}, {time.perf_counter() - started:.2f} s")
    if info.vocab_size < vocab_size:
        click.echo(f"note: asked for {vocab_size}, got {info.vocab_size}: the corpus has no more pairs seen "
                   f">= {min_frequency} times")
