"""``TokenDataset``: a prepared dataset directory as one flat token stream in memory.

Every shard is checked (see ``shards.read_shard``) and its token values are concatenated, in manifest order,
into one numpy array. Each document already carries its own BOS and EOS, so the stream reads ``BOS doc0 EOS
BOS doc1 EOS ...`` and a training window that crosses a document boundary sees the separator.

Memory: the stream costs 2 bytes per token (uint16), e.g. 16 MB for the ~8M-token embedded corpus or 2 GB for
1B tokens; every data-parallel rank holds its own copy. Larger corpora want a memory-mapped stream; the loader
only needs ``tokens`` to support fancy indexing, so that can be swapped in without touching it.

Legend: N = tokens in the stream, D = documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymoe.data.corpus import embedded_dataset
from raymoe.data.shards import DatasetInfo, read_manifest, read_shard


def load_dataset(path: str | Path | None = None, *, progress: bool = True) -> TokenDataset:
    """``TokenDataset(path)``, or the embedded corpus when ``path`` is empty (``DataConfig.path == ""``)."""
    return TokenDataset(path if path else embedded_dataset(progress=progress))


class TokenDataset:
    """Load and validate ``path`` (a directory written by ``prepare_data``)."""

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.info: DatasetInfo = read_manifest(path)
        values, lengths = zip(*(read_shard(self.info, shard, verify=verify) for shard in self.info.shards))
        self.tokens_N: np.ndarray = np.concatenate(values)
        self.tokens_N.flags.writeable = False
        self.doc_offsets_D1 = np.zeros(self.info.num_documents + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lengths), out=self.doc_offsets_D1[1:])

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream (read-only, dtype uint16 for the byte tokenizer)."""
        return self.tokens_N

    @property
    def num_tokens(self) -> int:
        return len(self.tokens_N)

    @property
    def num_documents(self) -> int:
        return self.info.num_documents

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def document(self, doc_id: int) -> np.ndarray:
        """The ids of one document, BOS and EOS included."""
        if not 0 <= doc_id < self.num_documents:
            raise ValueError(f"doc_id {doc_id} out of range: the dataset has {self.num_documents} documents")
        return self.tokens_N[self.doc_offsets_D1[doc_id] : self.doc_offsets_D1[doc_id + 1]]

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.path)!r}, tokens={self.num_tokens:,}, documents={self.num_documents:,}, "
            f"shards={len(self.info.shards)}, tokenizer={self.info.tokenizer!r})"
        )
