"""``prepare_data``: a corpus in (text files, JSONL, Parquet), a checked Parquet token dataset out, in one process.

This is the single-process path (tiny inputs, tests, and the reference the Ray Data pipeline in
``raymoe/runtime/data_prep.py`` must match byte for byte). Which files and documents a corpus holds is
decided in ``sources.py``; how documents become shards, and the held-out split, in ``shards.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from raymoe.data.manifest import DatasetInfo
from raymoe.data.shards import DEFAULT_ROW_GROUP_TOKENS, check_options, check_writable, write_dataset
from raymoe.data.sources import (
    BINARY_POLICIES,
    DEFAULT_PATTERNS,
    find_input_files,
    input_format,
    read_documents,
)
from raymoe.data.tokenizer import ByteTokenizer, Tokenizer

DEFAULT_SHARD_TOKENS = 1 << 22  # ~4M tokens: ~8 MB of uint16 before compression

def prepare_data(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer: Tokenizer | None = None,
    patterns: Sequence[str] | None = None,
    field: str | None = None,
    column: str | None = None,
    on_binary: str = "raise",
    holdout: float = 0.0,
    row_group_tokens: int = DEFAULT_ROW_GROUP_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Tokenize ``sources`` (files, or directories searched recursively for ``patterns``): text files by
    default, JSONL records' ``field``, or Parquet rows' ``column``; ``holdout`` > 0 also writes ``holdout/``."""
    tokenizer = tokenizer or ByteTokenizer()
    fmt = input_format(field, column)
    if on_binary not in BINARY_POLICIES:
        raise ValueError(f"on_binary must be one of {list(BINARY_POLICIES)}, got {on_binary!r}")
    check_options(shard_tokens=shard_tokens, row_group_tokens=row_group_tokens, holdout=holdout)
    check_writable(Path(out_dir), overwrite=overwrite)
    files = find_input_files(sources, patterns or DEFAULT_PATTERNS[fmt])
    total_bytes = sum(path.stat().st_size for path, _ in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", delay=1.0, disable=not progress)
    with bar:
        documents = read_documents(files, fmt, on_binary=on_binary, field=field or "", column=column or "",
                                   on_bytes=bar.update)
        return write_dataset(documents, out_dir, tokenizer=tokenizer, shard_tokens=shard_tokens,
                             row_group_tokens=row_group_tokens, holdout=holdout, overwrite=overwrite)

