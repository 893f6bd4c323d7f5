"""``TokenStream``: a dataset's token stream read lazily, one Parquet row group at a time, in bounded memory.

The loader asks for windows of consecutive tokens at arbitrary positions of the stream ``BOS doc0 EOS BOS
doc1 EOS ...``. The stream keeps only an index — where each row group starts in the stream and in document
numbering (from the manifest, or for format-v1 datasets from one pass over the files at open) — and an LRU
cache of decompressed row groups bounded by ``cache_bytes``. A window that crosses a row-group or shard
boundary is stitched from both. So memory is the cache plus the index (16 bytes per row group), never the
dataset: a dataset many times larger than RAM trains like a small one.

Checks: at open, every shard must exist with its recorded size and (``verify``) sha256, hashed in 1 MiB
chunks so verification needs no memory either; each row group is checked (length, dtype, id range) when it
is first decompressed. ``ArrayStream`` is the trivially correct twin over an in-memory array.

Legend: B = windows in a batch, W = window length, G = row groups.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymoe.data.manifest import MANIFEST, DatasetInfo, ShardInfo

DEFAULT_CACHE_BYTES = 64 << 20


class ArrayStream:
    """A token stream already in memory (tests, tiny datasets); the same interface as ``TokenStream``."""

    def __init__(self, tokens_N: np.ndarray) -> None:
        self.tokens_N = np.asarray(tokens_N)

    def __len__(self) -> int:
        return len(self.tokens_N)

    def windows(self, starts_B: np.ndarray, length: int) -> np.ndarray:
        return self.tokens_N[np.asarray(starts_B, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)]

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens_N[start:stop]


class TokenStream:
    """Lazy view of the token stream of ``info`` (a dataset directory's manifest)."""

    def __init__(self, info: DatasetInfo, *, verify: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.info = info
        self.dtype = np.dtype(info.token_dtype)
        self.cache_bytes = cache_bytes
        files, tokens_G, docs_G, where = [], [], [], []
        for s, shard in enumerate(info.shards):
            file = _checked_file(info.path, shard, verify)
            files.append(file)
            groups = _row_groups(file, shard)
            tokens_G.extend(t for t, _ in groups)
            docs_G.extend(d for _, d in groups)
            where.extend((s, g) for g in range(len(groups)))
        self._files = files
        self._where = where
        self.group_start_G1 = np.zeros(len(tokens_G) + 1, dtype=np.int64)
        np.cumsum(tokens_G, out=self.group_start_G1[1:])
        self.group_doc_G1 = np.zeros(len(docs_G) + 1, dtype=np.int64)
        np.cumsum(docs_G, out=self.group_doc_G1[1:])
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self.num_group_reads = 0
        """Row groups decompressed so far (cache misses): what a test or benchmark looks at."""

    def __len__(self) -> int:
        return int(self.group_start_G1[-1])

    @property
    def num_row_groups(self) -> int:
        return len(self._where)

    def windows(self, starts_B: np.ndarray, length: int) -> np.ndarray:
        """``(B, length)`` tokens: row ``b`` is the stream from ``starts_B[b]`` on."""
        out_BW = np.empty((len(starts_B), length), dtype=self.dtype)
        for b, start in enumerate(np.asarray(starts_B, dtype=np.int64)):
            out_BW[b] = self.read(int(start), int(start) + length)
        return out_BW

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (a copy when it spans row groups)."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"token range [{start}, {stop}) is outside the stream of {len(self)} tokens")
        g = int(np.searchsorted(self.group_start_G1, start, side="right")) - 1
        parts = []
        while start < stop:
            values, _ = self._group(g)
            lo = start - int(self.group_start_G1[g])
            take = min(stop - start, len(values) - lo)
            parts.append(values[lo : lo + take])
            start += take
            g += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def document(self, doc_id: int) -> np.ndarray:
        """The ids of document ``doc_id`` (BOS and EOS included)."""
        g = int(np.searchsorted(self.group_doc_G1, doc_id, side="right")) - 1
        values, offsets = self._group(g)
        row = doc_id - int(self.group_doc_G1[g])
        return values[offsets[row] : offsets[row + 1]]

    def _group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        if (hit := self._cache.get(g)) is not None:
            self._cache.move_to_end(g)
            return hit
        s, r = self._where[g]
        values, offsets = read_row_group(self._files[s], r, self.info, expect_tokens=self._group_tokens(g))
        self.num_group_reads += 1
        self._cache[g] = (values, offsets)
        self._cached_bytes += values.nbytes + offsets.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:  # keep at least the newest
            _, (old_v, old_o) = self._cache.popitem(last=False)
            self._cached_bytes -= old_v.nbytes + old_o.nbytes
        return values, offsets

    def _group_tokens(self, g: int) -> int:
        return int(self.group_start_G1[g + 1] - self.group_start_G1[g])


def read_row_group(file: Path, index: int, info: DatasetInfo, *, expect_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Row group ``index`` of shard ``file``: flat token values and document offsets, checked."""
    try:
        column = pq.ParquetFile(file).read_row_group(index, columns=["tokens"]).column("tokens").combine_chunks()
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"shard {file} is not a readable token shard: {exc}") from exc
    values = column.flatten().to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
    if len(values) != expect_tokens:
        raise ValueError(f"shard {file} row group {index} holds {len(values)} tokens, manifest says {expect_tokens}")
    if values.dtype != np.dtype(info.token_dtype) or (len(values) and values.max() >= info.vocab_size):
        raise ValueError(f"shard {file} holds ids outside the {info.tokenizer.name} vocabulary of {info.vocab_size}")
    values.flags.writeable = False
    return values, offsets


def _checked_file(root: Path, shard: ShardInfo, verify: bool) -> Path:
    file = root / shard.file
    if not file.is_file():
        raise ValueError(f"shard {file} listed in {MANIFEST} is missing")
    if (size := file.stat().st_size) != shard.num_bytes:
        raise ValueError(f"shard {file} is corrupt: {size} bytes, manifest says {shard.num_bytes}")
    if verify:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != shard.sha256:
            raise ValueError(f"shard {file} is corrupt: its sha256 {digest.hexdigest()[:16]}... differs from the "
                             f"manifest's {shard.sha256[:16]}...")
    return file


def _row_groups(file: Path, shard: ShardInfo) -> list[tuple[int, int]]:
    """``(tokens, documents)`` per row group: documents from the Parquet footer, tokens from the manifest (v2)
    or, for v1 shards, from the files' list offsets (one row group in memory at a time)."""
    try:
        meta = pq.ParquetFile(file).metadata
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"shard {file} is not a readable token shard: {exc}") from exc
    docs = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if sum(docs) != shard.num_documents:
        raise ValueError(f"shard {file} holds {sum(docs)} documents, manifest says {shard.num_documents}")
    tokens = shard.row_group_tokens
    if tokens is None:
        parquet = pq.ParquetFile(file)
        tokens = []
        for i in range(meta.num_row_groups):
            offsets = parquet.read_row_group(i, columns=["tokens"]).column("tokens").combine_chunks().offsets
            tokens.append(offsets[len(offsets) - 1].as_py() - offsets[0].as_py())
        if sum(tokens) != shard.num_tokens:
            raise ValueError(f"shard {file} holds {sum(tokens)} tokens, manifest says {shard.num_tokens}")
    if len(tokens) != len(docs):
        raise ValueError(f"shard {file} has {len(docs)} row groups, manifest lists {len(tokens)}")
    return list(zip(tokens, docs))
