"""The embedded default corpus: the Python standard library's own source code, tokenized on first use.

Every Python installation carries a few hundred MB of well-written, varied ``.py`` text. Training on a slice
of it needs no network, no download and no shipped copy of anyone's text, and it is the same on every machine
that runs the same Python version — which is what a reproducible default needs.

How the slice is chosen (deterministically):
1. every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, sorted by relative path, skipping test suites
   (``test``, ``tests``, ``idle_test``), installed packages (``site-packages``, ``dist-packages``), caches and
   hidden directories;
2. files are considered in the order of a fixed hash of their relative path — a reproducible shuffle, so the
   slice samples the whole library instead of only modules whose names start with ``a`` to ``e`` — and each
   one that still fits in the byte budget (default 8 MiB) is taken;
3. the chosen files are tokenized in sorted path order, each as one document named ``stdlib/<relative path>``.

The prepared dataset lives in ``$RAYMOE_CACHE`` (default ``~/.cache/raymoe``) under ``corpus-<key>``, the key
being a hash of the Python version, the byte budget and this recipe's version; later calls just return that
directory. Concurrent first calls (several Ray workers) are safe: each builds into its own temporary directory
and the first rename wins.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from raymoe.data.manifest import DatasetInfo, read_manifest
from raymoe.data.prepare import DEFAULT_SHARD_TOKENS
from raymoe.data.shards import write_dataset
from raymoe.data.sources import decode_text
from raymoe.data.tokenizer import ByteTokenizer

DEFAULT_BYTE_BUDGET = 8 << 20
CORPUS_VERSION = 2  # 2: format-v2 shards (row groups indexed in the manifest)
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def embedded_dataset(
    cache_dir: str | Path | None = None, *, byte_budget: int = DEFAULT_BYTE_BUDGET, progress: bool = True
) -> Path:
    """The embedded corpus's dataset directory, building it the first time (~0.5 s for 8 MiB)."""
    path = cache_root(cache_dir) / f"corpus-{corpus_key(byte_budget)}"
    if _is_valid(path):
        return path
    if path.exists():  # a damaged cache entry (interrupted copy, disk trouble): the cache is ours to rebuild
        shutil.rmtree(path, ignore_errors=True)
    try:
        build_embedded_corpus(path, byte_budget=byte_budget, progress=progress)
    except (FileExistsError, ValueError):
        if not _is_valid(path):  # not a lost race with another builder: a real error
            raise
    return path


def build_embedded_corpus(
    out_dir: str | Path,
    *,
    byte_budget: int = DEFAULT_BYTE_BUDGET,
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Tokenize the standard-library slice into ``out_dir`` (see the module docstring)."""
    root = stdlib_root()
    files = select_files(stdlib_files(root), root, byte_budget)
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="embedded corpus", delay=1.0, disable=not progress)
    with bar:
        return write_dataset(
            _documents(files, root, bar),
            out_dir,
            tokenizer=ByteTokenizer(),
            shard_tokens=DEFAULT_SHARD_TOKENS,
            overwrite=overwrite,
        )


def embedded_texts(byte_budget: int = DEFAULT_BYTE_BUDGET) -> Iterator[str]:
    """The embedded corpus's documents as text, in order (what ``raymoe train-tokenizer --embedded`` learns from)."""
    root = stdlib_root()
    files = select_files(stdlib_files(root), root, byte_budget)
    for _, text in _documents(files, root, tqdm(disable=True)):
        yield text


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("RAYMOE_CACHE") or "~/.cache/raymoe").expanduser()


def corpus_key(byte_budget: int) -> str:
    recipe = f"{CORPUS_VERSION}|{platform.python_implementation()}|{sys.version}|{byte_budget}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"the Python standard library directory {root} does not exist; pass a dataset path instead")
    return root


def stdlib_files(root: Path) -> list[Path]:
    """Every eligible ``.py`` file under ``root``, sorted by relative path."""
    files = []
    for folder, subdirs, names in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (often far bigger than the stdlib).
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.startswith(".")]
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    files = [path for path in files if path.is_file()]
    if not files:
        raise ValueError(f"found no .py files under the standard library directory {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def select_files(files: list[Path], root: Path, byte_budget: int) -> list[Path]:
    """The files that fill ``byte_budget`` in hash order, returned in sorted path order."""
    if byte_budget <= 0:
        raise ValueError(f"byte_budget must be > 0, got {byte_budget}")

    def shuffle_key(path: Path) -> str:
        return hashlib.blake2b(path.relative_to(root).as_posix().encode(), digest_size=8).hexdigest()

    chosen, used = [], 0
    for path in sorted(files, key=shuffle_key):
        size = path.stat().st_size
        if 0 < size and used + size <= byte_budget:
            chosen.append(path)
            used += size
    if not chosen:
        smallest = min(f.stat().st_size for f in files)
        raise ValueError(f"byte_budget={byte_budget} is smaller than the smallest stdlib file ({smallest} bytes)")
    return sorted(chosen, key=lambda p: p.relative_to(root).as_posix())


def _documents(files: list[Path], root: Path, bar: tqdm) -> Iterator[tuple[str, str]]:
    for path in files:
        data = path.read_bytes()
        bar.update(len(data))
        text = decode_text(data, path, on_binary="skip")
        if text:
            yield f"stdlib/{path.relative_to(root).as_posix()}", text


def _is_valid(path: Path) -> bool:
    """Manifest readable and every shard present at its recorded size (cheap: checksums wait for loading)."""
    try:
        info = read_manifest(path)
    except ValueError:
        return False
    return all(
        (file := path / shard.file).is_file() and file.stat().st_size == shard.num_bytes for shard in info.shards
    )
