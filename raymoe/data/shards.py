"""The on-disk token dataset: Parquet shards plus a ``manifest.json`` that lists and checksums them.

Layout of a dataset directory::

    manifest.json            format, tokenizer, totals, and per shard: file, documents, tokens, bytes, sha256,
                             tokens per row group (see ``manifest.py``)
    tokenizer.json           the tokenizer that made the ids (absent for the byte tokenizer)
    shard-00000.parquet      one row per document, row groups of ~``row_group_tokens`` tokens
    shard-00001.parquet      ...
    holdout/                 with ``holdout > 0``: the held-out documents, itself an ordinary dataset directory

Shard schema (one row per document, zstd-compressed)::

    doc_id   int64           position of the document in its split (0, 1, 2, ... across shards)
    source   string          where the text came from (a file path, ``path#record``, ``stdlib/<module path>``)
    tokens   list<uint16>    the document's ids, BOS first and EOS last (list<uint32> if vocab > 65536)

A list column is the efficient form of "a flat token column plus offsets": Arrow stores it exactly that way
(one contiguous values buffer and an int32 offsets buffer), and reading it back gives the flat token array
without a per-document copy. Documents are never split across shards; a shard is closed as soon as it holds
``shard_tokens`` tokens. Row groups (~64K tokens, ~50 KB compressed, by default) are the unit the lazy reader
(``stream.py``) decompresses, so training touches a bounded amount of memory whatever the dataset's size.

The concatenation of every shard's token values, in shard order, is the dataset's token stream
``BOS doc0 EOS BOS doc1 EOS ...`` that the loader cuts into training windows.

Held-out split: a document goes to ``holdout/`` when a hash of its source name falls below the ``holdout``
fraction. The decision depends on nothing else, so it is the same for any number of Ray workers or blocks, and
adding files to a corpus never moves an existing document across.

Writing is atomic: everything goes to a hidden temporary directory next to the target (the held-out
manifest, then the top-level manifest last), which is renamed into place only when complete, so a crash never
leaves a half-written dataset that looks valid. ``DatasetWriter`` is the one writer: the single-process path
(``write_dataset``) and the Ray Data path both feed it tokenized documents in input order, which is why their
outputs are byte-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymoe.data.manifest import MANIFEST, DatasetInfo, HoldoutInfo, ShardInfo
from raymoe.data.tokenizer import Tokenizer, token_dtype

MAX_SHARD_TOKENS = (1 << 31) - 1  # int32 list offsets
DEFAULT_ROW_GROUP_TOKENS = 1 << 16
HOLDOUT_DIR = "holdout"
ENCODE_BATCH_DOCS = 256  # documents per tokenizer call: HF tokenizers encode a batch in Rust


def write_dataset(
    documents: Iterable[tuple[str, str]],
    out_dir: str | Path,
    *,
    tokenizer: Tokenizer,
    shard_tokens: int,
    row_group_tokens: int = DEFAULT_ROW_GROUP_TOKENS,
    holdout: float = 0.0,
    overwrite: bool = False,
) -> DatasetInfo:
    """Tokenize ``(source, text)`` pairs into shards in ``out_dir``, atomically; refuses an empty corpus."""
    with DatasetWriter(out_dir, tokenizer=tokenizer, shard_tokens=shard_tokens, row_group_tokens=row_group_tokens,
                       holdout=holdout, overwrite=overwrite) as writer:
        batch: list[tuple[str, str]] = []
        for source, text in documents:
            if text:
                batch.append((source, text))
            if len(batch) == ENCODE_BATCH_DOCS:
                writer.add_texts(batch)
                batch = []
        writer.add_texts(batch)
        return writer.commit()


class DatasetWriter:
    """Tokenized documents in, in input order; shards (and the held-out split) out, published atomically.

    ``with DatasetWriter(...) as w: w.add(source, ids); ...; info = w.commit()``; leaving the block without
    ``commit`` (an exception) deletes everything written.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        tokenizer: Tokenizer,
        shard_tokens: int,
        row_group_tokens: int = DEFAULT_ROW_GROUP_TOKENS,
        holdout: float = 0.0,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        check_options(shard_tokens=shard_tokens, row_group_tokens=row_group_tokens, holdout=holdout)
        check_writable(self.out_dir, overwrite=overwrite)
        self.tokenizer = tokenizer
        self.holdout = holdout
        self.overwrite = overwrite
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self._train = _SplitWriter(self.tmp, tokenizer, shard_tokens, row_group_tokens)
        self._held = None
        if holdout:
            self._held = _SplitWriter(self.tmp / HOLDOUT_DIR, tokenizer, shard_tokens, row_group_tokens)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.tmp.exists():  # not committed: an error, or commit() never called
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def num_documents(self) -> int:
        return self._train.num_documents + (self._held.num_documents if self._held else 0)

    def add(self, source: str, ids_L: np.ndarray) -> None:
        """One document's ids (BOS first, EOS last); its split is decided by ``source`` alone."""
        held = self._held is not None and is_held_out(source, self.holdout)
        (self._held if held else self._train).add(source, ids_L)

    def add_texts(self, documents: list[tuple[str, str]]) -> None:
        if documents:
            for (source, _), ids_L in zip(documents, self.tokenizer.encode_arrays([t for _, t in documents])):
                self.add(source, ids_L)

    def commit(self) -> DatasetInfo:
        if self.num_documents == 0:
            raise ValueError(
                f"no text to write to {self.out_dir}: every source document was empty (or skipped as binary)"
            )
        holdout = None
        if self._held is not None:
            if self._held.num_documents == 0 or self._train.num_documents == 0:
                raise ValueError(
                    f"holdout={self.holdout} put {self._held.num_documents} of {self.num_documents} documents in "
                    f"the held-out split; both splits need at least one document (choose another fraction)"
                )
            self._held.finish(None)  # the held-out manifest first: the top-level one is the commit point
            holdout = HoldoutInfo(dir=HOLDOUT_DIR, fraction=self.holdout)
        info = self._train.finish(holdout)
        _move_into_place(self.tmp, self.out_dir, overwrite=self.overwrite)
        return DatasetInfo(**{**info.__dict__, "path": self.out_dir})


def check_options(*, shard_tokens: int, row_group_tokens: int, holdout: float) -> None:
    """Writer options, checked before any input is read."""
    if not 0 < shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"shard_tokens must be in [1, {MAX_SHARD_TOKENS}], got {shard_tokens}")
    if row_group_tokens < 1:
        raise ValueError(f"row_group_tokens must be >= 1, got {row_group_tokens}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout}")


def is_held_out(source: str, fraction: float) -> bool:
    """Whether the document named ``source`` belongs to the held-out split (a fixed hash, see the docstring)."""
    digest = hashlib.blake2b(source.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * (1 << 64)


class _SplitWriter:
    """Shards of one split: buffers one shard's documents, writes it in row groups once it is full."""

    def __init__(self, directory: Path, tokenizer: Tokenizer, shard_tokens: int, row_group_tokens: int) -> None:
        self.directory = directory
        self.tokenizer = tokenizer
        self.shard_tokens = shard_tokens
        self.row_group_tokens = row_group_tokens
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.shards: list[ShardInfo] = []
        self._written = 0  # documents in finished shards: the next shard's first doc_id
        self._rows: list[tuple[str, np.ndarray]] = []
        self._rows_tokens = 0

    def add(self, source: str, ids_L: np.ndarray) -> None:
        if len(ids_L) > MAX_SHARD_TOKENS:
            raise ValueError(f"{source}: {len(ids_L)} tokens is more than one shard can hold ({MAX_SHARD_TOKENS})")
        if self._rows and self._rows_tokens + len(ids_L) > MAX_SHARD_TOKENS:
            self._flush()
        self._rows.append((source, ids_L))
        self._rows_tokens += len(ids_L)
        if self._rows_tokens >= self.shard_tokens:
            self._flush()

    @property
    def num_documents(self) -> int:
        return self._written + len(self._rows)

    def finish(self, holdout: HoldoutInfo | None) -> DatasetInfo:
        self._flush()
        tokenizer = self.tokenizer.info
        if (data := self.tokenizer.file_bytes()) is not None:
            (self.directory / tokenizer.file).write_bytes(data)
        info = DatasetInfo(
            path=self.directory,
            tokenizer=tokenizer,
            token_dtype=str(self.dtype),
            num_documents=self.num_documents,
            num_tokens=sum(s.num_tokens for s in self.shards),
            shards=tuple(self.shards),
            holdout=holdout,
        )
        (self.directory / MANIFEST).write_text(json.dumps(info.to_manifest(), indent=2) + "\n")
        return info

    def _flush(self) -> None:
        if not self._rows:
            return
        self.directory.mkdir(exist_ok=True)
        path = self.directory / f"shard-{len(self.shards):05d}.parquet"
        self.shards.append(_write_shard(path, self._rows, self._written, self.dtype, self.row_group_tokens))
        self._written += len(self._rows)
        self._rows, self._rows_tokens = [], 0


def _write_shard(
    path: Path, rows: list[tuple[str, np.ndarray]], first_doc_id: int, dtype: np.dtype, row_group_tokens: int
) -> ShardInfo:
    groups, start, tokens = [], 0, 0
    for i, (_, ids) in enumerate(rows):  # a row group closes once it holds row_group_tokens tokens
        tokens += len(ids)
        if tokens >= row_group_tokens or i == len(rows) - 1:
            groups.append((start, i + 1, tokens))
            start, tokens = i + 1, 0
    schema = pa.schema([("doc_id", pa.int64()), ("source", pa.string()),
                        ("tokens", pa.list_(pa.from_numpy_dtype(dtype)))])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for lo, hi, _ in groups:
            writer.write_table(_table(rows[lo:hi], first_doc_id + lo, dtype, schema), row_group_size=hi - lo)
    data = path.read_bytes()
    return ShardInfo(
        file=path.name,
        num_documents=len(rows),
        num_tokens=sum(g[2] for g in groups),
        num_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        row_group_tokens=tuple(g[2] for g in groups),
    )


def _table(rows: list[tuple[str, np.ndarray]], first_doc_id: int, dtype: np.dtype, schema: pa.Schema) -> pa.Table:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(ids) for _, ids in rows], out=offsets[1:])
    values = np.concatenate([ids for _, ids in rows]).astype(dtype, copy=False)
    return pa.table(
        {
            "doc_id": pa.array(np.arange(first_doc_id, first_doc_id + len(rows), dtype=np.int64)),
            "source": pa.array([source for source, _ in rows], type=pa.string()),
            "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        },
        schema=schema,
    )


def check_writable(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse early (before tokenizing anything) to replace a non-empty directory.

    ``overwrite`` replaces only an existing dataset (a directory with a manifest), never arbitrary files.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} exists and is not a directory")
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return
    if not overwrite:
        raise ValueError(f"output directory {out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    if not (out_dir / MANIFEST).is_file():
        raise ValueError(f"refusing to overwrite {out_dir}: it holds files but is not a dataset (no {MANIFEST})")


def _move_into_place(tmp: Path, out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:  # someone else finished first while we were writing
            raise FileExistsError(f"{out_dir} appeared while writing the dataset")
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    with contextlib.suppress(OSError):  # an empty directory may be replaced; rename() needs it gone
        out_dir.rmdir()
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:  # ENOTEMPTY/EEXIST: another writer got there between our check and the rename
        raise FileExistsError(f"{out_dir} appeared while writing the dataset") from exc
