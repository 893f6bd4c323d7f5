"""``TokenDataset``: a prepared dataset directory, its token stream read lazily (``stream.TokenStream``).

Opening a dataset checks its manifest and every shard's presence, size and sha256, and indexes the row
groups; no token is decompressed until the loader asks for it, so memory stays bounded by the row-group cache
(64 MiB by default) however large the dataset. ``tokens`` materializes the whole stream as one array (2
bytes per token for vocabularies up to 65,536) for small datasets, tests and analysis. Each document carries its
own BOS and EOS, so the stream reads ``BOS doc0 EOS BOS doc1 EOS ...`` and a training window that crosses a
document boundary sees the separator.

Legend: N = tokens in the stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymoe.data.corpus import embedded_dataset
from raymoe.data.manifest import DatasetInfo, read_manifest
from raymoe.data.stream import DEFAULT_CACHE_BYTES, TokenStream
from raymoe.data.tokenizer import BYTE_VOCAB_SIZE, TokenizerInfo


def load_dataset(path: str | Path | None = None, *, progress: bool = True) -> TokenDataset:
    """``TokenDataset(path)``, or the embedded corpus when ``path`` is empty (``DataConfig.path == ""``)."""
    return TokenDataset(path if path else embedded_dataset(progress=progress))


def dataset_tokenizer(path: str | Path | None) -> TokenizerInfo:
    """The tokenizer a dataset was prepared with, from its manifest alone (the embedded corpus: bytes)."""
    if not path:
        from raymoe.data.tokenizer import ByteTokenizer

        return ByteTokenizer().info
    return read_manifest(path).tokenizer


def check_vocab_fits(data_path: str | Path | None, model_vocab_size: int) -> TokenizerInfo:
    """Refuse a model whose embedding cannot hold every id of the dataset's tokenizer, naming both sizes."""
    tokenizer = dataset_tokenizer(data_path)
    if tokenizer.vocab_size > model_vocab_size:
        where = f"dataset {str(data_path)!r}" if data_path else "the embedded corpus"
        raise ValueError(
            f"model.vocab_size={model_vocab_size} is smaller than the vocab_size {tokenizer.vocab_size} of the "
            f"{tokenizer.name} tokenizer of {where}; set model.vocab_size={tokenizer.vocab_size} (or larger)"
        )
    return tokenizer


class TokenDataset:
    """Open and check ``path`` (a directory written by ``prepare_data``); tokens are read on demand."""

    def __init__(self, path: str | Path, *, verify: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.info: DatasetInfo = read_manifest(path)
        self.stream = TokenStream(self.info, verify=verify, cache_bytes=cache_bytes)
        self._tokens_N: np.ndarray | None = None

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream in memory (read-only; built on first use). Training never needs it."""
        if self._tokens_N is None:
            self._tokens_N = self.stream.read(0, len(self.stream)).copy()
            self._tokens_N.flags.writeable = False
        return self._tokens_N

    @property
    def num_tokens(self) -> int:
        return len(self.stream)

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
        return self.stream.document(doc_id)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.path)!r}, tokens={self.num_tokens:,}, documents={self.num_documents:,}, "
            f"shards={len(self.info.shards)}, tokenizer={self.info.tokenizer.name!r})"
        )


__all__ = ["BYTE_VOCAB_SIZE", "TokenDataset", "check_vocab_fits", "dataset_tokenizer", "load_dataset"]
