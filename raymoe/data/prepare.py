"""``prepare_data``: text files and directories in, a checked Parquet token dataset out.

Sources are read in a deterministic order (each argument in turn; a directory's matching files sorted by
path), so preparing the same inputs twice gives the same document ids and the same token stream.

Input policy, decided here once:
- a source that does not exist, a directory with no matching files, or no sources at all: ``ValueError``;
- a file named explicitly that is empty: ``ValueError`` (probably a mistake); empty files found inside a
  directory (``__init__.py``) are skipped;
- a binary file (it contains a NUL byte) or one that is not valid UTF-8: ``ValueError`` naming the file and
  the byte offset, or skipped with ``on_binary="skip"``;
- a leading UTF-8 byte-order mark is dropped; nothing else is changed (no newline or whitespace
  normalisation), so decoding a document gives back the file's text exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from raymoe.data.shards import DatasetInfo, check_writable, write_dataset
from raymoe.data.tokenizer import ByteTokenizer, Tokenizer

DEFAULT_SHARD_TOKENS = 1 << 22  # ~4M tokens: ~8 MB of uint16 before compression
DEFAULT_PATTERNS = ("*.txt",)
BINARY_POLICIES = ("raise", "skip")


def prepare_data(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer: Tokenizer | None = None,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    on_binary: str = "raise",
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Tokenize text ``sources`` (files, or directories searched recursively for ``patterns``)."""
    tokenizer = tokenizer or ByteTokenizer()
    if on_binary not in BINARY_POLICIES:
        raise ValueError(f"on_binary must be one of {list(BINARY_POLICIES)}, got {on_binary!r}")
    check_writable(Path(out_dir), overwrite=overwrite)
    files = find_text_files(sources, patterns)
    total_bytes = sum(path.stat().st_size for path, _ in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", delay=1.0, disable=not progress)
    with bar:
        documents = _read_documents(files, on_binary, bar)
        return write_dataset(documents, out_dir, tokenizer=tokenizer, shard_tokens=shard_tokens, overwrite=overwrite)


def find_text_files(sources: Sequence[str | Path], patterns: Sequence[str]) -> list[tuple[Path, bool]]:
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


def _read_documents(files: list[tuple[Path, bool]], on_binary: str, bar: tqdm) -> Iterator[tuple[str, str]]:
    for path, explicit in files:
        data = path.read_bytes()
        bar.update(len(data))
        if not data:
            if explicit:
                raise ValueError(f"source file {path} is empty")
            continue
        text = decode_text(data, path, on_binary)
        if text is not None:
            yield str(path), text


def decode_text(data: bytes, path: Path | str, on_binary: str) -> str | None:
    """The file's text, or None when it is binary/undecodable and ``on_binary == "skip"``."""
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
