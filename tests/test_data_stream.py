"""The lazy loader: row-group reads give exactly today's batches (dp sharding, cursor), in bounded memory."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raymoe.data import ByteTokenizer, Cursor, PackedBatches, TokenDataset, embedded_dataset
from raymoe.data.shards import write_dataset
from raymoe.data.stream import ArrayStream

CAPPED = Path(__file__).with_name("_data_capped_loader.py")


def _batches(source, *, dp_size=1, dp_rank=0, n=6, cursor=None, seq_len=64, batch=8):
    loader = PackedBatches(source, seq_len=seq_len, global_batch_size=batch, extra_tokens=2, seed=5,
                           dp_rank=dp_rank, dp_size=dp_size, cursor=cursor)
    return [loader.next_batch() for _ in range(n)], loader.cursor


@pytest.fixture(scope="module")
def small_groups(tmp_path_factory):
    """Many tiny row groups and shards, so nearly every window crosses a boundary."""
    texts = [(f"d{i}", "".join(chr(97 + (i * j) % 26) for j in range(50 + 37 * i))) for i in range(40)]
    out = tmp_path_factory.mktemp("groups") / "ds"
    write_dataset(texts, out, tokenizer=ByteTokenizer(), shard_tokens=3000, row_group_tokens=300)
    return out


def test_lazy_batches_equal_in_memory_batches(small_groups):
    ds = TokenDataset(small_groups, cache_bytes=2048)  # a cache of ~2 row groups: constant eviction
    assert ds.stream.num_row_groups > 20 and len(ds.info.shards) > 3
    in_memory = ds.tokens.copy()
    for dp_size in (1, 2, 4):
        for rank in range(dp_size):
            lazy, cur = _batches(ds, dp_size=dp_size, dp_rank=rank, n=30)
            ref, ref_cur = _batches(in_memory, dp_size=dp_size, dp_rank=rank, n=30)
            assert all(np.array_equal(a, b) for a, b in zip(lazy, ref)) and cur == ref_cur
    head, cur = _batches(ds, n=7)  # resume from the cursor: the same next batches as one run
    tail, _ = _batches(TokenDataset(small_groups), n=5, cursor=Cursor.from_dict(cur.to_dict()))
    whole, _ = _batches(in_memory, n=12)
    assert all(np.array_equal(a, b) for a, b in zip(head + tail, whole))


def test_documents_and_reads_across_boundaries(small_groups):
    ds = TokenDataset(small_groups, cache_bytes=1)
    tokens = ds.tokens
    starts = np.cumsum([0] + [len(ds.document(d)) for d in range(ds.num_documents)])
    assert starts[-1] == len(tokens)
    for d in (0, 7, ds.num_documents - 1):
        doc = ds.document(d)
        assert doc[0] == ByteTokenizer.bos_id and doc[-1] == ByteTokenizer.eos_id
        assert np.array_equal(doc, tokens[starts[d] : starts[d + 1]])
    for start, stop in [(0, 1), (295, 905), (len(tokens) - 3, len(tokens))]:
        assert np.array_equal(ds.stream.read(start, stop), tokens[start:stop])
    with pytest.raises(ValueError, match="outside the stream"):
        ds.stream.read(0, len(tokens) + 1)


def test_embedded_corpus_batches_unchanged():
    """Today's default dataset: lazy loader == the whole-array loader of the first version."""
    ds = TokenDataset(embedded_dataset(progress=False))
    ref_tokens = ArrayStream(ds.tokens)
    for dp_size in (1, 2):
        lazy, cur = _batches(ds, dp_size=dp_size, dp_rank=dp_size - 1, seq_len=128, batch=16, n=5)
        ref, ref_cur = _batches(ref_tokens.tokens_N, dp_size=dp_size, dp_rank=dp_size - 1, seq_len=128, batch=16, n=5)
        assert all(np.array_equal(a, b) for a, b in zip(lazy, ref)) and cur == ref_cur


def test_version_1_datasets_still_load(small_groups, tmp_path):
    """A manifest written before row groups were indexed: the index is rebuilt from the files."""
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(small_groups, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = 1
    manifest["tokenizer"] = {k: manifest["tokenizer"][k] for k in ("name", "vocab_size", "bos_id", "eos_id")}
    for shard in manifest["shards"]:
        del shard["row_group_tokens"]
    del manifest["holdout"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert np.array_equal(TokenDataset(old).tokens, TokenDataset(small_groups).tokens)
    assert TokenDataset(old).info.tokenizer.pad_id == ByteTokenizer.pad_id


def _bulky_dataset(path: Path, num_tokens: int) -> None:
    """Varied text made fast: slices of one random block at many offsets (zstd cannot squash it to nothing)."""
    rng = np.random.default_rng(0)
    block = rng.integers(32, 127, size=1 << 21, dtype=np.uint8).tobytes().decode()
    doc_len = 1 << 20
    docs = ((f"d{i}", block[(i * 7919) % (1 << 20) :][:doc_len]) for i in range(num_tokens // doc_len))
    write_dataset(docs, path, tokenizer=ByteTokenizer(), shard_tokens=1 << 23)


def test_dataset_larger_than_a_memory_cap(tmp_path):
    """Under RLIMIT_AS = (address space after imports) + 16 MiB, a 32 MiB token stream (16M uint16 tokens) that
    cannot be held is iterated by the lazy loader (4 MiB row-group cache) with the same batches, dp shards and
    cursors as the in-memory loader computes here."""
    cap_mib = 16
    _bulky_dataset(tmp_path / "big", 16 << 20)
    ds = TokenDataset(tmp_path / "big")
    assert ds.num_tokens * ds.tokens.itemsize >= 2 * (cap_mib << 20)
    env = dict(os.environ, MALLOC_ARENA_MAX="1", PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, str(CAPPED), str(tmp_path / "big"), str(cap_mib)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    capped = json.loads(run.stdout.strip().splitlines()[-1])
    assert capped["whole_stream_fits"] is False  # the cap really is below the dataset
    tokens = ds.tokens  # the reference, in this (uncapped) process
    for dp in (1, 2):
        for rank in range(dp):
            ref, cursor = _batches(tokens, dp_size=dp, dp_rank=rank, seq_len=256, n=20)
            assert capped[f"dp{dp}"][rank] == [hashlib.sha256(b.numpy().tobytes()).hexdigest() for b in ref]
            assert capped[f"cursor{dp}"] == cursor.to_dict()
