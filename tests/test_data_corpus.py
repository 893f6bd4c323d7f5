"""The embedded stdlib corpus: builds deterministically within its byte budget, caches, and self-heals."""

import os

import pyarrow.parquet as pq
import pytest

from raymoe.data import ByteTokenizer, TokenDataset, embedded_dataset
from raymoe.data.corpus import SKIP_DIRS, corpus_key, select_files, stdlib_files, stdlib_root

BUDGET = 300_000  # small enough to build in well under a second


def test_builds_within_budget_from_stdlib_sources(tmp_path):
    path = embedded_dataset(tmp_path, byte_budget=BUDGET, progress=False)
    assert path == tmp_path / f"corpus-{corpus_key(BUDGET)}"
    ds = TokenDataset(path)
    sources = [s for shard in ds.info.shards for s in pq.read_table(path / shard.file)["source"].to_pylist()]
    assert sources == sorted(sources) and all(s.startswith("stdlib/") and s.endswith(".py") for s in sources)
    assert not any(part in SKIP_DIRS for s in sources for part in s.split("/")[1:-1])
    text_bytes = ds.num_tokens - 2 * ds.num_documents
    assert BUDGET * 0.9 < text_bytes <= BUDGET  # the budget is filled, never exceeded
    # Each document is the module's source text, byte for byte.
    root = stdlib_root()
    first = (root / sources[0].removeprefix("stdlib/")).read_text(encoding="utf-8")
    assert ByteTokenizer().decode(ds.document(0)) == first.removeprefix("\ufeff")


def test_deterministic_and_cached(tmp_path):
    a = embedded_dataset(tmp_path / "a", byte_budget=BUDGET, progress=False)
    b = embedded_dataset(tmp_path / "b", byte_budget=BUDGET, progress=False)
    assert TokenDataset(a).info.shards == TokenDataset(b).info.shards  # same files, same sha256
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert embedded_dataset(tmp_path / "a", byte_budget=BUDGET, progress=False) == a
    assert (a / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_cache_dir_from_environment_and_rebuild_when_broken(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYMOE_CACHE", str(tmp_path / "env-cache"))
    path = embedded_dataset(byte_budget=BUDGET, progress=False)
    assert path.parent == tmp_path / "env-cache"
    shard = path / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged cache is rebuilt, not trusted
    assert embedded_dataset(byte_budget=BUDGET, progress=False) == path
    TokenDataset(path)  # checksums verify again
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_selection_spreads_over_the_library_and_rejects_bad_budgets():
    root = stdlib_root()
    files = stdlib_files(root)
    chosen = select_files(files, root, BUDGET)
    assert sum(f.stat().st_size for f in chosen) <= BUDGET
    packages = {f.relative_to(root).parts[0] for f in chosen if len(f.relative_to(root).parts) > 1}
    assert len(packages) >= 3  # a hash-ordered sample, not the alphabetically first modules
    assert all(os.path.getsize(f) > 0 for f in chosen)
    with pytest.raises(ValueError, match="byte_budget must be > 0"):
        select_files(files, root, 0)
    with pytest.raises(ValueError, match="smaller than the smallest stdlib file"):
        select_files(files, root, 1)


def test_load_dataset_defaults_to_the_embedded_corpus(tmp_path, monkeypatch):
    from raymoe.data import dataset

    built = embedded_dataset(tmp_path, byte_budget=BUDGET, progress=False)
    # An empty DataConfig.path means "the embedded corpus": load_dataset asks embedded_dataset for it.
    monkeypatch.setattr(dataset, "embedded_dataset", lambda progress: built)
    assert dataset.load_dataset("").path == built
    assert dataset.load_dataset(str(built)).num_tokens == TokenDataset(built).num_tokens
