"""A byte-level tokenizer: every UTF-8 byte is a token, plus four special ids.

Why bytes: nothing to download or train, every string round-trips exactly, and the vocabulary (260) is small
enough that a toy model's embedding table stays tiny. The price is ~4x longer sequences than a BPE tokenizer
on English text, which does not matter for checking training mechanics.

    ids 0..255   the byte values
    256          BOS  (begin of document)
    257          EOS  (end of document)
    258          PAD
    259          reserved (keeps the vocabulary a multiple of 4; never produced)

``Tokenizer`` is the seam for other tokenizers: ``prepare_data`` only needs the members of the Protocol.
Subword tokenizers (Hugging Face ``tokenizer.json`` files) live in ``bpe.py``; ``TokenizerInfo`` is what a
dataset manifest and a checkpoint record about whichever tokenizer made the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

NUM_BYTES = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
RESERVED_ID = 259
BYTE_VOCAB_SIZE = 260


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    """What a dataset manifest and a checkpoint record about a tokenizer, so nobody has to guess it later."""

    name: str
    """``byte``, or ``hf-<model>-<vocab>`` for a ``tokenizer.json`` (``hf-bpe-4096``)."""
    vocab_size: int
    """Largest id + 1; a model's ``vocab_size`` must be at least this."""
    bos_id: int
    eos_id: int
    pad_id: int
    file: str | None = None
    """File name of the tokenizer copied next to the data (``tokenizer.json``); None for the byte tokenizer."""
    sha256: str | None = None
    """SHA-256 of that file's bytes: identifies the exact vocabulary and merges."""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "file": self.file,
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerInfo:
        """Also reads format-v1 manifests, which recorded only name, vocab size, BOS and EOS (byte tokenizer)."""
        return cls(
            name=str(data["name"]),
            vocab_size=int(data["vocab_size"]),
            bos_id=int(data["bos_id"]),
            eos_id=int(data["eos_id"]),
            pad_id=int(data.get("pad_id", PAD_ID if data["name"] == "byte" else data["eos_id"])),
            file=None if data.get("file") is None else str(data["file"]),
            sha256=None if data.get("sha256") is None else str(data["sha256"]),
        )


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]: ...

    def encode_array(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Same ids as ``encode``, as a 1-D unsigned integer array (the fast path for whole corpora)."""
        ...

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode_array`` of each text, BOS and EOS added (one call per batch: HF tokenizers run it in Rust)."""
        ...

    def decode(self, ids) -> str: ...

    @property
    def info(self) -> TokenizerInfo: ...

    def file_bytes(self) -> bytes | None:
        """The tokenizer file to ship with data and checkpoints, or None when the name says it all."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens; see the module docstring for the id layout."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return self.encode_array(text, add_bos=add_bos, add_eos=add_eos).tolist()

    def encode_array(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        data = text.encode("utf-8")
        ids = np.empty(len(data) + int(add_bos) + int(add_eos), dtype=np.uint16)
        body = ids[int(add_bos) : len(ids) - int(add_eos)]
        body[:] = np.frombuffer(data, dtype=np.uint8)
        if add_bos:
            ids[0] = BOS_ID
        if add_eos:
            ids[-1] = EOS_ID
        return ids

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(text) for text in texts]

    @property
    def info(self) -> TokenizerInfo:
        return TokenizerInfo(name=self.name, vocab_size=self.vocab_size, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)

    def file_bytes(self) -> bytes | None:
        return None

    def decode(self, ids) -> str:
        """Bytes back to text. Specials are dropped; bad UTF-8 (a window cut mid-character) becomes U+FFFD."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= self.vocab_size):
            bad = ids_N[(ids_N < 0) | (ids_N >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
        return ids_N[ids_N < NUM_BYTES].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id (uint16 for the byte tokenizer)."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in 32-bit token ids")
