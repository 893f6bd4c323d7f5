"""Loss, perplexity and bits per byte of the main model on a token stream.

Legend: B windows per batch, T tokens per window, E vocab.

Which tokens: the dataset's stream (documents back to back, each BOS ... EOS, as training sees it) cut into
consecutive windows of T inputs from its start, each predicting the next T tokens (the last label of a window is
the first input of the next, so every label is predicted exactly once), up to ``max_tokens`` labels. No
shuffling, no sampling: the same directory gives the same number on every run and machine.

Bits per byte: the summed cross-entropy in bits over the number of UTF-8 bytes predicted (labels that are byte
tokens; BOS/EOS carry no bytes but their loss counts). It compares models across tokenizers; with the byte
tokenizer it is loss / ln 2 scaled by tokens per byte (slightly above 1 because of the document separators).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raymoe.data.tokenizer import NUM_BYTES
from raymoe.generate.forward import logits
from raymoe.model.transformer import Transformer


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    loss: float
    """Mean next-token cross-entropy, nats per token."""
    perplexity: float
    bits_per_byte: float
    tokens: int
    """Labels evaluated."""
    bytes: int
    """Of which UTF-8 bytes (the rest are BOS/EOS)."""

    def to_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def windows(tokens_N: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """(W, seq_len + 1) consecutive windows from the stream's start covering up to ``max_tokens`` labels."""
    num_windows = (len(tokens_N) - 1) // seq_len
    if max_tokens > 0:
        num_windows = min(num_windows, max(1, max_tokens // seq_len))
    if num_windows < 1:
        raise ValueError(f"the dataset has {len(tokens_N)} tokens: too few for one window of {seq_len} + 1")
    starts = np.arange(num_windows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens_N[starts].astype(np.int64))


@torch.no_grad()
def evaluate(model: Transformer, tokens_N: np.ndarray, *, seq_len: int, batch_size: int = 8,
             max_tokens: int = 131072) -> EvalResult:
    """Evaluate ``model`` (routing biases already set) on the first ``max_tokens`` labels of ``tokens_N``
    (0: all of them)."""
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds model.max_seq_len {model.cfg.max_seq_len}")
    if int(tokens_N.max(initial=0)) >= model.cfg.vocab_size:
        raise ValueError(f"token id {int(tokens_N.max())} is outside the model's vocabulary ({model.cfg.vocab_size})")
    all_WL = windows(tokens_N, seq_len, max_tokens)
    nats, count, num_bytes = 0.0, 0, 0
    for batch_BL in all_WL.split(batch_size):
        labels_BT = batch_BL[:, 1:]
        logits_BTE = logits(model, batch_BL[:, :-1])
        nats += float(F.cross_entropy(logits_BTE.flatten(0, 1), labels_BT.flatten(), reduction="sum").double())
        count += labels_BT.numel()
        num_bytes += int((labels_BT < NUM_BYTES).sum())
    loss = nats / count
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_byte=nats / math.log(2) / max(num_bytes, 1),
                      tokens=count, bytes=num_bytes)


def load_stream(path: str) -> np.ndarray:
    """A dataset directory's token stream ('' = the embedded corpus)."""
    from raymoe.data import load_dataset

    return load_dataset(path, progress=False).tokens
