"""Input policy: which files a corpus is made of, and what counts as a document in each format.

Three formats, one rule each, shared by the single-process reader here and the Ray Data pipeline
(``raymoe/runtime/data_prep.py``), so both see the same documents under the same names:

- text (the default): a document is a whole file, named by its ``path``; default glob ``*.txt``;
- jsonl (``field=NAME``): a document is ``obj[NAME]`` of one JSON object per line, named ``path#i`` for the
  i-th record (blank lines skipped); default glob ``*.jsonl``;
- parquet (``column=NAME``): a document is one row's string in ``NAME``, named ``path#i`` for the i-th row;
  default glob ``*.parquet``.

Files are read in a deterministic order (arguments in turn; a directory's matching files sorted by path;
hidden directories skipped; duplicates once). Errors are ``ValueError``s that name the file and the line,
record, row or column:
- a source that does not exist, a directory with no matching files, no sources: error;
- text: a named empty file is an error, an empty file inside a directory (``__init__.py``) is skipped; a
  binary file (a NUL byte) or invalid UTF-8 is an error with the byte offset, or skipped with
  ``on_binary="skip"``; a leading UTF-8 BOM is dropped and nothing else is changed, so a document decodes
  back to the file exactly;
- jsonl: a line that is not a JSON object, a record without the field, or a field that is not a string;
- parquet: a file without the column, a column that is not a string type, or a null in it.
Empty strings are skipped (no empty documents).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

FORMATS = ("text", "jsonl", "parquet")
DEFAULT_PATTERNS = {"text": ("*.txt",), "jsonl": ("*.jsonl",), "parquet": ("*.parquet",)}
BINARY_POLICIES = ("raise", "skip")


def input_format(field: str | None, column: str | None) -> str:
    if field and column:
        raise ValueError(f"give field={field!r} (JSONL inputs) or column={column!r} (Parquet inputs), not both")
    return "jsonl" if field else "parquet" if column else "text"


def find_input_files(sources: Sequence[str | Path], patterns: Sequence[str]) -> list[tuple[Path, bool]]:
    """``(path, named_explicitly)`` for every file to read, in a deterministic order, without duplicates."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ValueError("prepare_data needs at least one source file or directory, got none")
    if not patterns:
        raise ValueError("patterns must name at least one glob pattern, e.g. '*.txt'")
    files: list[tuple[Path, bool]] = []
    seen: set[Path] = set()
    for source in map(Path, sources):
        if source.is_file():
            found = [(source, True)]
        elif source.is_dir():
            found = [(path, False) for path in _walk(source, patterns)]
            if not found:
                raise ValueError(f"no files matching {list(patterns)} under directory {source}")
        else:
            raise ValueError(f"source {source} does not exist (or is not a regular file or directory)")
        for path, explicit in found:
            if (key := path.resolve()) not in seen:
                seen.add(key)
                files.append((path, explicit))
    return files


def _walk(root: Path, patterns: Sequence[str]) -> list[Path]:
    matches = {path for pattern in patterns for path in root.rglob(pattern) if path.is_file()}
    # Hidden directories (.git, .venv) are never corpus text.
    visible = [p for p in matches if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(visible)


# ------------------------------------------------------------------------------------------ the per-format rules


def decode_text(data: bytes, path: Path | str, on_binary: str) -> str | None:
    """A text file's content, or None when it is binary/undecodable and ``on_binary == "skip"``."""
    problem = None
    if (nul := data.find(b"\x00")) >= 0:
        problem = f"looks binary (NUL byte at offset {nul})"
    else:
        try:
            return data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            problem = f"is not valid UTF-8 (byte offset {exc.start}: {exc.reason})"
    if on_binary == "skip":
        return None
    raise ValueError(f"source file {path} {problem}; convert it to UTF-8 text or pass on_binary='skip' (--skip-binary)")


def text_problem(value, *, name: str, kind: str) -> str | None:
    """Why one JSONL field / Parquet cell is not a document's text, or None when it is."""
    if value is None:
        return f"{kind} {name!r} is missing or null"
    if not isinstance(value, str):
        return f"{kind} {name!r} holds a {type(value).__name__}, not text"
    return None


def record_text(value, *, where: str, name: str, kind: str) -> str:
    """The text of one JSONL field / Parquet cell, or a ValueError saying ``where`` and why not."""
    if (problem := text_problem(value, name=name, kind=kind)) is not None:
        raise ValueError(f"{where}: {problem}")
    return value


def check_parquet_column(path: Path, column: str) -> None:
    """The column exists and holds strings (read from the footer; no data page is decoded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"source file {path} is not a readable Parquet file: {exc}") from exc
    if column not in schema.names:
        raise ValueError(f"source file {path} has no column {column!r}; its columns are {schema.names}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"source file {path} column {column!r} has type {kind}, not a string (text) column")


def jsonl_line_of(path: Path, record: int) -> int:
    """The 1-based line number of the ``record``-th non-blank line (for error messages)."""
    with open(path, "rb") as f:
        seen = -1
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == record:
                    return number
    return -1


# ------------------------------------------------------------------------------------ single-process readers


def read_documents(
    files: list[tuple[Path, bool]], fmt: str, *, on_binary: str = "raise", field: str = "", column: str = "",
    on_bytes=None,
) -> Iterator[tuple[str, str]]:
    """``(source name, text)`` of every document, in order; ``on_bytes(n)`` is told each file's size (progress)."""
    for path, explicit in files:
        if on_bytes is not None:
            on_bytes(path.stat().st_size)
        if fmt == "text":
            yield from _text_file(path, explicit, on_binary)
        elif fmt == "jsonl":
            yield from _jsonl_file(path, field)
        else:
            yield from _parquet_file(path, column)


def _text_file(path: Path, explicit: bool, on_binary: str) -> Iterator[tuple[str, str]]:
    data = path.read_bytes()
    if not data:
        if explicit:
            raise ValueError(f"source file {path} is empty")
        return
    text = decode_text(data, path, on_binary)
    if text:
        yield str(path), text


def _jsonl_file(path: Path, field: str) -> Iterator[tuple[str, str]]:
    record = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(_lines(f, path), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"source file {path} line {number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"source file {path} line {number}: a JSON {type(obj).__name__}, not an object")
            text = record_text(obj.get(field), where=f"source file {path} line {number}", name=field, kind="field")
            if text:
                yield f"{path}#{record}", text
            record += 1


def _lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as exc:
        raise ValueError(f"source file {path} is not valid UTF-8 (byte offset {exc.start}: {exc.reason})") from exc


def _parquet_file(path: Path, column: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    check_parquet_column(path, column)
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            text = record_text(value, where=f"source file {path} row {row}", name=column, kind="column")
            if text:
                yield f"{path}#{row}", text
            row += 1
