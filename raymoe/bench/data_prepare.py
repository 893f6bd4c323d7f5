"""``prepare-data`` throughput: one process vs Ray Data on this machine's cores, on a >= 100 MB local corpus.

The corpus is assembled locally (no download): copies of the Python standard library's ``.py`` files, each
copy's files prefixed with a line naming the copy so no two documents are equal, until ``target_mb`` is
reached. Both engines write the same bytes (checked here: the manifests are compared), so the only difference
is where tokenizing happens. Tokenizers: bytes (where reading, encoding and Parquet writing dominate) and a
byte-level BPE trained on the embedded corpus (where encoding dominates). The single-process path calls HF
``encode_batch``, which itself runs on every core in Rust threads; Ray Data adds process parallelism and
overlaps reading, tokenizing and the driver's writing. ``ray.init`` is timed separately, not in the runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from raymoe.bench.load import machine_load


def build_corpus(root: Path, target_mb: int) -> tuple[int, int]:
    """Copies of the stdlib sources under ``root`` until ``target_mb`` MB; returns (files, bytes)."""
    from raymoe.data.corpus import stdlib_files, stdlib_root

    stdlib = stdlib_root()
    sources = []
    for path in stdlib_files(stdlib):
        data = path.read_bytes()
        if data and b"\x00" not in data:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            sources.append((path.relative_to(stdlib).as_posix().replace("/", "__"), data))
    total, files, copy = 0, 0, 0
    while total < target_mb * 1_000_000:
        folder = root / f"copy{copy:03d}"
        folder.mkdir(parents=True)
        for name, data in sources:
            blob = f"# corpus copy {copy}\n".encode() + data
            (folder / f"{name}.txt").write_bytes(blob)
            total += len(blob)
            files += 1
            if total >= target_mb * 1_000_000:
                break
        copy += 1
    return files, total


def run(out_dir: Path, *, quick: bool = False, target_mb: int = 100) -> dict:
    from raymoe.data import ByteTokenizer, prepare_data, train_bpe
    from raymoe.data.corpus import embedded_texts
    from raymoe.runtime.data_prep import prepare_data_ray, ray_session

    target_mb = 5 if quick else target_mb
    rows = []
    with tempfile.TemporaryDirectory(prefix="raymoe-bench-prep-") as tmp:
        corpus = Path(tmp) / "corpus"
        num_files, num_bytes = build_corpus(corpus, target_mb)
        bpe = train_bpe(embedded_texts(), 4096, progress=False)
        started = time.perf_counter()
        with ray_session(num_cpus=os.cpu_count()):
            init_s = time.perf_counter() - started
            for tokenizer in (ByteTokenizer(), bpe):
                manifests = {}
                for engine in ("local", "ray"):
                    out = Path(tmp) / f"{tokenizer.name}-{engine}"
                    load = machine_load()
                    started = time.perf_counter()
                    prepare = prepare_data if engine == "local" else prepare_data_ray
                    info = prepare([corpus], out, tokenizer=tokenizer, progress=False)
                    seconds = time.perf_counter() - started
                    manifests[engine] = (out / "manifest.json").read_text()
                    rows.append({"tokenizer": tokenizer.name, "engine": engine, "seconds": seconds,
                                 "tokens": info.num_tokens, "tokens_per_s": info.num_tokens / seconds,
                                 "mb_per_s": num_bytes / 1e6 / seconds, "load_before": load,
                                 "load_after": machine_load()})
                    shutil.rmtree(out)
                assert manifests["local"] == manifests["ray"], "Ray Data wrote different shards than one process"
    result = {"rows": rows, "corpus_files": num_files, "corpus_bytes": num_bytes, "ray_init_s": init_s,
              "cpus": os.cpu_count()}
    (out_dir / "data_prepare.json").write_text(json.dumps(result, indent=2))
    markdown = _table(rows, num_files, num_bytes, init_s)
    (out_dir / "data_prepare.md").write_text(markdown + "\n")
    return {"markdown": markdown, "rows": rows}


def _table(rows: list[dict], files: int, size: int, init_s: float) -> str:
    lines = [f"Corpus: {files:,} files, {size / 1e6:.1f} MB; {os.cpu_count()} CPUs; `ray.init` {init_s:.1f} s "
             "(not included below).", "",
             "| tokenizer | engine | seconds | tokens | tokens/s | MB/s | load avg 1m (before -> after) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['engine']} | {r['seconds']:.1f} | {r['tokens']:,} | "
                     f"{r['tokens_per_s']:,.0f} | {r['mb_per_s']:.1f} | {r['load_before']['loadavg_1m']:.1f} -> "
                     f"{r['load_after']['loadavg_1m']:.1f} |")
    return "\n".join(lines)
