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
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

NUM_BYTES = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
RESERVED_ID = 259
BYTE_VOCAB_SIZE = 260


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

    def decode(self, ids) -> str: ...


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
