"""Tokenizers on the embedded corpus: compression (tokens per byte) and the bits per byte of a short ``small`` run.

Bits per byte is the fair comparison across tokenizers: a model's loss is per token, and a BPE token stands
for several bytes, so ``bits/byte = loss_nats_per_token * tokens_per_byte / ln 2``.

Method. BPE tokenizers are trained (``train_bpe``) on the embedded corpus's training split and measured on its
held-out split (``--holdout 0.1`` by document-name hash; the same documents for every tokenizer), so the
compression is out of sample. Each tokenizer's dataset is prepared from the same documents, and the ``small``
preset trains ``steps`` steps on it with ``--engine local`` and ``model.vocab_size`` set to the tokenizer's.
The loss used is the mean main loss of the last ``tail`` steps: in the first epoch every batch is new to the
model when its loss is computed (the update comes after), so this is an honest estimate of held-out loss.
Tokens per byte in the conversion is the training dataset's (BOS/EOS included, i.e. what the model predicts).
Same steps, batch and ``seq_len`` for every tokenizer, so BPE runs see more bytes per step: that is the
point of a subword tokenizer, and bits per byte accounts for it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from raymoe.bench.load import machine_load

VOCAB_SIZES = (1024, 4096)


def run(out_dir: Path, *, quick: bool = False, steps: int = 60, tail: int = 10, threads: int = 1) -> dict:
    import torch

    from raymoe.data import ByteTokenizer, TokenDataset, embedded_dataset, train_bpe
    from raymoe.data.corpus import embedded_texts
    from raymoe.data.shards import is_held_out, write_dataset

    # One torch thread: on a shared, oversubscribed machine two spinning threads per step made steps 30-70 s.
    torch.set_num_threads(threads)
    steps, vocab_sizes = (6, VOCAB_SIZES[:1]) if quick else (steps, VOCAB_SIZES)
    tail = min(tail, steps // 2)
    embedded_dataset(progress=False)  # built (or found) before any timing
    documents = [(f"doc{i}", text) for i, text in enumerate(embedded_texts())]
    train_docs = [(s, t) for s, t in documents if not is_held_out(s, 0.1)]
    held_docs = [(s, t) for s, t in documents if is_held_out(s, 0.1)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="raymoe-bench-tok-") as tmp:
        tokenizers, train_s = [ByteTokenizer()], {"byte": 0.0}
        for vocab in vocab_sizes:
            started = time.perf_counter()
            tokenizers.append(train_bpe((t for _, t in train_docs), vocab, progress=False))
            train_s[tokenizers[-1].name] = time.perf_counter() - started
        for tokenizer in tokenizers:
            data = Path(tmp) / tokenizer.name
            write_dataset(train_docs, data, tokenizer=tokenizer, shard_tokens=1 << 22)
            ds = TokenDataset(data)
            train_bytes = sum(len(t.encode()) for _, t in train_docs)
            held_bytes = sum(len(t.encode()) for _, t in held_docs)
            held_tokens = sum(len(ids) - 2 for ids in tokenizer.encode_arrays([t for _, t in held_docs]))
            loss, seconds = _short_run(data, tokenizer.vocab_size, steps, tail, Path(tmp) / f"run-{tokenizer.name}")
            tokens_per_byte = ds.num_tokens / train_bytes
            rows.append({
                "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                "train_s": train_s[tokenizer.name],
                "heldout_tokens_per_byte": held_tokens / held_bytes,
                "heldout_bytes_per_token": held_bytes / held_tokens,
                "dataset_tokens": ds.num_tokens, "dataset_tokens_per_byte": tokens_per_byte,
                "steps": steps, "loss_last": loss, "bits_per_byte": loss * tokens_per_byte / math.log(2),
                "bytes_seen": steps * 16 * 128 / tokens_per_byte, "run_s": seconds,
            })
    result = {"rows": rows, "steps": steps, "tail": tail, "load": machine_load(),
              "corpus_documents": len(documents), "heldout_documents": len(held_docs)}
    (out_dir / "data_tokenizers.json").write_text(json.dumps(result, indent=2))
    markdown = _table(rows, steps, tail)
    (out_dir / "data_tokenizers.md").write_text(markdown + "\n")
    return {"markdown": markdown, "rows": rows}


def _short_run(data: Path, vocab_size: int, steps: int, tail: int, out: Path) -> tuple[float, float]:
    from raymoe.config import load_config
    from raymoe.train.local import train_local

    config = load_config("small", [f"data.path={data}", f"model.vocab_size={vocab_size}", f"run.steps={steps}",
                                   "run.checkpoint_every=0", "run.checkpoint_on_stop=false"])
    started = time.perf_counter()
    records = train_local(config, out_dir=str(out), progress=False)
    return float(np.mean([r["loss"] for r in records[-tail:]])), time.perf_counter() - started


def _table(rows: list[dict], steps: int, tail: int) -> str:
    lines = [
        f"| tokenizer | vocab | held-out tokens/byte | bytes/token | `small`, {steps} steps: loss (last {tail}) "
        f"| bits/byte | bytes seen |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['vocab_size']} | {r['heldout_tokens_per_byte']:.3f} | "
            f"{r['heldout_bytes_per_token']:.2f} | {r['loss_last']:.3f} | {r['bits_per_byte']:.3f} | "
            f"{r['bytes_seen'] / 1e6:.2f} MB |"
        )
    return "\n".join(lines)
