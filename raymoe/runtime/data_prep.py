"""``prepare-data`` on Ray Data: read and tokenize in parallel, write the same bytes as the single-process path.

The pipeline::

    read_binary_files (text) | read_json (JSONL) | read_parquet (--column)      one block per file or part
      -> map_batches(_tokenize_batch)   tasks, one tokenizer per worker: (path, tokens, status, problem)
      -> iter_batches on the driver, in input order (preserve_order)
      -> DatasetWriter            shards + held-out split + manifest last, atomic (raymoe/data/shards.py)

Why the driver writes: the output must be byte-identical whatever the number of blocks or workers (the test
compares 1 and 4 blocks, and both against the single-process path). Tokenizing is the expensive part and runs
on every core of the cluster; shard boundaries, document ids and the held-out split depend only on the
documents in input order, which ``preserve_order`` delivers, so one writer in input order gives the same
shards as ``raymoe.data.prepare_data``. The cost is that the shards are written by one process, on the
driver's filesystem (on a cluster, run the job where ``--out`` is mounted).

Text files are read with ``read_binary_files`` rather than ``read_text``: a document is a whole file (as in the
single-process path), and the NUL-byte / UTF-8 check needs the raw bytes. Bad inputs never abort inside Ray
with a wrapped traceback: the tokenizer marks the row, and the driver raises the same ``ValueError`` the
single-process path would, naming the file and the line, record or row. An error inside Ray's own readers
(a malformed JSON line) is located by re-reading the inputs with the single-process reader.

Legend: R = rows of a block.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from raymoe.data.bpe import tokenizer_from_bytes
from raymoe.data.manifest import DatasetInfo
from raymoe.data.prepare import DEFAULT_SHARD_TOKENS
from raymoe.data.shards import DEFAULT_ROW_GROUP_TOKENS, DatasetWriter, check_options, check_writable
from raymoe.data.sources import (
    BINARY_POLICIES,
    DEFAULT_PATTERNS,
    check_parquet_column,
    decode_text,
    find_input_files,
    input_format,
    jsonl_line_of,
    read_documents,
    text_problem,
)
from raymoe.data.tokenizer import ByteTokenizer, Tokenizer, token_dtype

OK, SKIP, BAD = 0, 1, 2  # row status from the tokenizer actors


def prepare_data_ray(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    patterns: Sequence[str] | None = None,
    field: str | None = None,
    column: str | None = None,
    on_binary: str = "raise",
    holdout: float = 0.0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    row_group_tokens: int = DEFAULT_ROW_GROUP_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
    address: str = "",
    num_blocks: int | None = None,
    num_workers: int | None = None,
) -> DatasetInfo:
    """``raymoe.data.prepare_data`` on Ray Data (same arguments, same output bytes); ``address`` joins a
    cluster, ``num_blocks`` overrides Ray's read parallelism, ``num_workers`` caps concurrent tokenize tasks."""
    import ray

    tokenizer = tokenizer or ByteTokenizer()
    fmt = input_format(field, column)
    if on_binary not in BINARY_POLICIES:
        raise ValueError(f"on_binary must be one of {list(BINARY_POLICIES)}, got {on_binary!r}")
    check_options(shard_tokens=shard_tokens, row_group_tokens=row_group_tokens, holdout=holdout)
    check_writable(Path(out_dir), overwrite=overwrite)
    files = _checked_files(sources, patterns or DEFAULT_PATTERNS[fmt], fmt, column)
    started = _init_ray(address)
    try:
        rows = _pipeline(files, fmt, tokenizer, field or column or "", on_binary, progress, num_blocks, num_workers)
        with DatasetWriter(out_dir, tokenizer=tokenizer, shard_tokens=shard_tokens,
                           row_group_tokens=row_group_tokens, holdout=holdout, overwrite=overwrite) as writer:
            _write_rows(rows, files, fmt, field or column or "", writer, progress)
            return writer.commit()
    except ray.exceptions.RayError as exc:  # a reader failed inside Ray: find the input with the local reader
        for _ in read_documents(files, fmt, on_binary=on_binary, field=field or "", column=column or ""):
            pass
        raise ValueError(f"Ray Data failed reading the inputs: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        if started:
            ray.shutdown()


def _checked_files(sources, patterns, fmt: str, column: str | None) -> list[tuple[Path, bool]]:
    """What can be checked before Ray starts: the file list, named empty files, Parquet schemas."""
    files = find_input_files(sources, patterns)
    for path, explicit in files:
        if explicit and fmt == "text" and path.stat().st_size == 0:
            raise ValueError(f"source file {path} is empty")
        if fmt == "parquet":
            check_parquet_column(path, column)
    return files


@contextlib.contextmanager
def ray_session(address: str = "", *, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for several ``prepare_data_ray`` calls (benchmarks: start-up paid once); reuses a running session."""
    import ray

    started = _init_ray(address, num_cpus=num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _init_ray(address: str, *, num_cpus: int | None = None) -> bool:
    import ray

    if ray.is_initialized():  # inside `ray job submit`, or a caller's session
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    joining = bool(address) or bool(os.environ.get("RAY_ADDRESS"))
    ray.init(address=address or None, log_to_driver=False, include_dashboard=False,
             num_cpus=None if joining else num_cpus)
    return True


def _pipeline(files, fmt, tokenizer, name, on_binary, progress, num_blocks, num_workers):
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the output must not depend on which task finishes first
    context.enable_progress_bars = progress
    paths = [str(path) for path, _ in files]
    read_args = {"include_paths": True, "override_num_blocks": num_blocks}
    if fmt == "text":
        ds = ray.data.read_binary_files(paths, **read_args)
    elif fmt == "jsonl":
        ds = ray.data.read_json(paths, lines=True, **read_args)
    else:
        ds = ray.data.read_parquet(paths, columns=[name], **read_args)
    return ds.map_batches(
        _tokenize_batch,
        fn_kwargs={"tokenizer_file": tokenizer.file_bytes(), "info": tokenizer.info, "fmt": fmt, "name": name,
                   "on_binary": on_binary},
        batch_format="pyarrow",
        batch_size=1024,
        num_cpus=1,
        concurrency=num_workers,
    )


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_file: bytes | None, info) -> Tokenizer:
    """One tokenizer per worker process and file. Tasks rather than an actor pool: actors holding every CPU
    starve the read tasks of a small cluster (it hangs at 2 CPUs), and tasks need no sizing."""
    if tokenizer_file is None:
        return ByteTokenizer()
    return tokenizer_from_bytes(tokenizer_file, info, source="<shipped tokenizer>")


def _tokenize_batch(batch: pa.Table, *, tokenizer_file, info, fmt: str, name: str, on_binary: str) -> pa.Table:
    """Ray Data UDF: every input row gives one output row, marked OK, SKIP or BAD (with the problem)."""
    tokenizer = _tokenizer(tokenizer_file, info)
    paths = batch.column("path").to_pylist()
    if fmt == "text":
        values = batch.column("bytes").to_pylist()
    else:
        values = batch.column(name).to_pylist() if name in batch.column_names else [None] * len(paths)
    status_R = np.zeros(len(paths), dtype=np.int8)
    problems: list[str | None] = [None] * len(paths)
    texts = []
    for r, (path, value) in enumerate(zip(paths, values)):
        text, problems[r] = _row_text(path, value, fmt, name, on_binary)
        status_R[r] = BAD if problems[r] else SKIP if not text else OK
        texts.append(text)
    encoded = iter(tokenizer.encode_arrays([t for t, s in zip(texts, status_R) if s == OK]))
    ids = [next(encoded) if s == OK else np.empty(0, np.uint32) for s in status_R]
    return _rows_table(paths, ids, status_R, problems)


def _row_text(path: str, value, fmt: str, name: str, on_binary: str) -> tuple[str, str | None]:
    if fmt == "text":
        try:
            return decode_text(value, path, on_binary) or "", None
        except ValueError as exc:
            return "", str(exc)
    problem = text_problem(value, name=name, kind="field" if fmt == "jsonl" else "column")
    return ("" if problem else value), problem


def _rows_table(paths: list[str], ids: list[np.ndarray], status_R: np.ndarray, problems: list) -> pa.Table:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    values = np.concatenate(ids).astype(np.uint32) if ids else np.empty(0, np.uint32)
    return pa.table({
        "path": pa.array(paths, type=pa.string()),
        "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "status": pa.array(status_R),
        "problem": pa.array(problems, type=pa.string()),
    })


def _write_rows(rows, files, fmt: str, name: str, writer: DatasetWriter, progress: bool) -> None:
    """Consume the tokenized rows in input order and hand them to the writer under their source names."""
    original = {str(Path(path).resolve()): path for path, _ in files}
    dtype = token_dtype(writer.tokenizer.vocab_size)
    record: dict[str, int] = {}  # rows seen per file: the ``#i`` of JSONL records and Parquet rows
    bar = tqdm(unit="doc", desc="tokenizing (ray)", delay=1.0, disable=not progress)
    with bar:
        for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
            tokens = batch.column("tokens").combine_chunks()
            values, offsets = tokens.flatten().to_numpy(), tokens.offsets.to_numpy()
            status, problems = batch.column("status").to_numpy(), batch.column("problem").to_pylist()
            for r, raw_path in enumerate(batch.column("path").to_pylist()):
                path = original.get(str(Path(raw_path).resolve()), Path(raw_path))
                i = record.get(raw_path, 0)
                record[raw_path] = i + 1
                if status[r] == BAD:
                    raise ValueError(_where(path, fmt, i) + problems[r] if fmt != "text" else problems[r])
                if status[r] == OK:
                    source = str(path) if fmt == "text" else f"{path}#{i}"
                    writer.add(source, values[offsets[r] : offsets[r + 1]].astype(dtype))
                    bar.update(1)


def _where(path: Path, fmt: str, record: int) -> str:
    if fmt == "jsonl":
        return f"source file {path} line {jsonl_line_of(path, record)}: "
    return f"source file {path} row {record}: "

