"""The on-disk token dataset: Parquet shards plus a ``manifest.json`` that lists and checksums them.

Layout of a dataset directory::

    manifest.json            format, tokenizer, totals, and per shard: file, documents, tokens, bytes, sha256
    shard-00000.parquet      one row per document
    shard-00001.parquet      ...

Shard schema (one row per document, zstd-compressed)::

    doc_id   int64           position of the document in the whole dataset (0, 1, 2, ... across shards)
    source   string          where the text came from (a file path, or ``stdlib/<module path>``)
    tokens   list<uint16>    the document's ids, BOS first and EOS last (list<uint32> if vocab > 65536)

A list column is the efficient form of "a flat token column plus offsets": Arrow stores it exactly that way
(one contiguous values buffer and an int32 offsets buffer), Parquet stores it as one column chunk, and reading
it back gives the flat token array without a per-document copy. Documents are never split across shards; a
shard is closed as soon as it holds ``shard_tokens`` tokens, so shards are about that size (bigger only by the
last document).

The concatenation of every shard's token values, in shard order, is the dataset's token stream
``BOS doc0 EOS BOS doc1 EOS ...`` that the loader cuts into training windows.

Writing is atomic: everything goes to a hidden temporary directory next to the target, which is renamed into
place only when complete, so a crash never leaves a half-written dataset that looks valid. Reading checks the
manifest, the presence, size and sha256 of every shard, and the token counts and id range, and names whatever
is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymoe.data.tokenizer import Tokenizer, token_dtype

MANIFEST = "manifest.json"
FORMAT = "raymoe.tokens"
FORMAT_VERSION = 1
MAX_SHARD_TOKENS = (1 << 31) - 1  # int32 list offsets


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    file: str
    num_documents: int
    num_tokens: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """What ``manifest.json`` says about a dataset; ``path`` is where it was found (not stored in it)."""

    path: Path
    tokenizer: str
    vocab_size: int
    bos_id: int
    eos_id: int
    token_dtype: str
    num_documents: int
    num_tokens: int
    shards: tuple[ShardInfo, ...]

    def to_manifest(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": {
                "name": self.tokenizer,
                "vocab_size": self.vocab_size,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
            },
            "token_dtype": self.token_dtype,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_manifest(cls, path: Path, manifest: dict) -> DatasetInfo:
        where = path / MANIFEST
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{where}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
                f"got {manifest.get('format')!r} version {manifest.get('version')!r}"
            )
        tok = _field(where, manifest, "tokenizer", dict)
        shards = _field(where, manifest, "shards", list)
        info = cls(
            path=path,
            tokenizer=_field(where, tok, "name", str, "tokenizer."),
            vocab_size=_field(where, tok, "vocab_size", int, "tokenizer."),
            bos_id=_field(where, tok, "bos_id", int, "tokenizer."),
            eos_id=_field(where, tok, "eos_id", int, "tokenizer."),
            token_dtype=_field(where, manifest, "token_dtype", str),
            num_documents=_field(where, manifest, "num_documents", int),
            num_tokens=_field(where, manifest, "num_tokens", int),
            shards=tuple(_shard_info(where, i, s) for i, s in enumerate(shards)),
        )
        if not info.shards:
            raise ValueError(f"{where} lists no shards")
        if sum(s.num_tokens for s in info.shards) != info.num_tokens:
            raise ValueError(f"{where}: shard token counts do not add up to num_tokens={info.num_tokens}")
        if sum(s.num_documents for s in info.shards) != info.num_documents:
            raise ValueError(f"{where}: shard document counts do not add up to num_documents={info.num_documents}")
        if info.token_dtype != str(token_dtype(info.vocab_size)):
            raise ValueError(f"{where}: token_dtype {info.token_dtype} does not match vocab_size {info.vocab_size}")
        return info


def _field(where: Path, record: dict, key: str, kind: type, prefix: str = ""):
    """``record[key]`` if it is there and of type ``kind`` (an int must be a non-negative JSON integer), else a
    ValueError naming the field (``int("lots")`` or ``sum`` over a string would name nothing)."""
    if key not in record:
        raise ValueError(f"{where} is malformed: field '{prefix}{key}' is missing")
    value = record[key]
    ok = isinstance(value, kind) and not (kind is int and (isinstance(value, bool) or value < 0))
    if not ok:
        expected = "a non-negative integer" if kind is int else f"a JSON {kind.__name__}".replace("dict", "object")
        raise ValueError(f"{where} is malformed: field '{prefix}{key}' must be {expected}, got {value!r}")
    return value


def _shard_info(where: Path, index: int, shard: object) -> ShardInfo:
    prefix = f"shards[{index}]."
    if not isinstance(shard, dict):
        raise ValueError(f"{where} is malformed: shards[{index}] must be a JSON object, got {shard!r}")
    unknown = sorted(set(shard) - {"file", "num_documents", "num_tokens", "num_bytes", "sha256"})
    if unknown:
        raise ValueError(f"{where} is malformed: shards[{index}] has unknown fields {unknown}")
    return ShardInfo(file=_field(where, shard, "file", str, prefix),
                     num_documents=_field(where, shard, "num_documents", int, prefix),
                     num_tokens=_field(where, shard, "num_tokens", int, prefix),
                     num_bytes=_field(where, shard, "num_bytes", int, prefix),
                     sha256=_field(where, shard, "sha256", str, prefix))


# ---------------------------------------------------------------------------------------------------- writing


def write_dataset(
    documents: Iterable[tuple[str, str]],
    out_dir: str | Path,
    *,
    tokenizer: Tokenizer,
    shard_tokens: int,
    overwrite: bool = False,
) -> DatasetInfo:
    """Tokenize ``(source, text)`` pairs into shards in ``out_dir``, atomically; refuses an empty corpus."""
    out_dir = Path(out_dir)
    if not 0 < shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"shard_tokens must be in [1, {MAX_SHARD_TOKENS}], got {shard_tokens}")
    check_writable(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards = []
        num_documents = 0
        for rows in _group_into_shards(documents, tokenizer, shard_tokens):
            shard = _write_shard(tmp / f"shard-{len(shards):05d}.parquet", rows, num_documents, tokenizer)
            shards.append(shard)
            num_documents += shard.num_documents
        if not shards:
            raise ValueError(f"no text to write to {out_dir}: every source document was empty (or skipped as binary)")
        info = DatasetInfo(
            path=out_dir,
            tokenizer=tokenizer.name,
            vocab_size=tokenizer.vocab_size,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            token_dtype=str(token_dtype(tokenizer.vocab_size)),
            num_documents=num_documents,
            num_tokens=sum(s.num_tokens for s in shards),
            shards=tuple(shards),
        )
        (tmp / MANIFEST).write_text(json.dumps(info.to_manifest(), indent=2) + "\n")
        _move_into_place(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


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


def _group_into_shards(
    documents: Iterable[tuple[str, str]], tokenizer: Tokenizer, shard_tokens: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    rows: list[tuple[str, np.ndarray]] = []
    num_tokens = 0
    for source, text in documents:
        if not text:
            continue
        ids_L = tokenizer.encode_array(text)
        if len(ids_L) > MAX_SHARD_TOKENS:
            raise ValueError(f"{source}: {len(ids_L)} tokens is more than one shard can hold ({MAX_SHARD_TOKENS})")
        if rows and num_tokens + len(ids_L) > MAX_SHARD_TOKENS:
            yield rows
            rows, num_tokens = [], 0
        rows.append((source, ids_L))
        num_tokens += len(ids_L)
        if num_tokens >= shard_tokens:
            yield rows
            rows, num_tokens = [], 0
    if rows:
        yield rows


def _write_shard(path: Path, rows: list[tuple[str, np.ndarray]], first_doc_id: int, tokenizer: Tokenizer) -> ShardInfo:
    dtype = token_dtype(tokenizer.vocab_size)
    lengths = np.array([len(ids) for _, ids in rows], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([ids for _, ids in rows]).astype(dtype, copy=False)
    table = pa.table(
        {
            "doc_id": pa.array(np.arange(first_doc_id, first_doc_id + len(rows), dtype=np.int64)),
            "source": pa.array([source for source, _ in rows], type=pa.string()),
            "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        }
    )
    pq.write_table(table, path, compression="zstd")
    data = path.read_bytes()
    return ShardInfo(
        file=path.name,
        num_documents=len(rows),
        num_tokens=int(lengths.sum()),
        num_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


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


# ---------------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> DatasetInfo:
    """Parse and check ``path/manifest.json`` (cheap: no shard is opened)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"dataset directory {path} does not exist")
    where = path / MANIFEST
    if not where.is_file():
        raise ValueError(
            f"{path} is not a raymoe dataset: {MANIFEST} is missing (write one with `raymoe prepare-data`)"
        )
    try:
        manifest = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(manifest).__name__}")
    return DatasetInfo.from_manifest(path, manifest)


def read_shard(info: DatasetInfo, shard: ShardInfo, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One shard's flat token values and per-document lengths, checked against the manifest.

    With ``verify`` the file's sha256 is compared with the manifest's (about 1 GB/s); the size, row and token
    counts and the id range are always checked.
    """
    file = info.path / shard.file
    if not file.is_file():
        raise ValueError(f"shard {file} listed in {MANIFEST} is missing")
    data = file.read_bytes()
    if len(data) != shard.num_bytes:
        raise ValueError(f"shard {file} is corrupt: {len(data)} bytes, manifest says {shard.num_bytes}")
    if verify and (digest := hashlib.sha256(data).hexdigest()) != shard.sha256:
        raise ValueError(
            f"shard {file} is corrupt: its sha256 {digest[:16]}... differs from the manifest's {shard.sha256[:16]}..."
        )
    try:
        column = pq.read_table(pa.BufferReader(data), columns=["tokens"]).column("tokens").combine_chunks()
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"shard {file} is not a readable token shard: {exc}") from exc
    values_N = column.flatten().to_numpy(zero_copy_only=False)
    lengths_D = np.diff(column.offsets.to_numpy())
    if len(column) != shard.num_documents or len(values_N) != shard.num_tokens:
        raise ValueError(
            f"shard {file} holds {len(column)} documents / {len(values_N)} tokens, "
            f"manifest says {shard.num_documents} / {shard.num_tokens}"
        )
    if values_N.dtype != np.dtype(info.token_dtype) or (len(values_N) and values_N.max() >= info.vocab_size):
        raise ValueError(f"shard {file} holds ids outside the {info.tokenizer} vocabulary of {info.vocab_size}")
    return values_N, lengths_D
