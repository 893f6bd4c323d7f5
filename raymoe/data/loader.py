"""Packed, deterministic, data-parallel batches with a resumable cursor.

Packing. The token stream (all documents back to back, each wrapped in BOS/EOS) is cut into windows of
``seq_len + extra_tokens`` consecutive tokens. Window ``w`` starts at token ``w * seq_len``, so the inputs of
consecutive windows tile the stream without overlap and only the ``extra_tokens`` label tokens at a window's
end are shared with the next one. ``extra_tokens = 1 + mtp_depth``: the model reads ``tokens[:, :T]`` as
input, ``tokens[:, 1:T+1]`` as next-token labels and ``tokens[:, k+1:T+k+1]`` as the labels of MTP depth
``k``. There is no padding and no attention mask: a window may span a document boundary, where the EOS/BOS
pair tells the model so (as in GPT-style pretraining). With ``N`` tokens there are
``(N - extra_tokens) // seq_len`` windows.

Order. Epoch ``e`` visits every window once, in the order ``default_rng([seed, e]).permutation(num_windows)``.
Samples are drawn from that order one after another, epoch after epoch, so a step's global batch may straddle
an epoch boundary and nothing is ever dropped.

Data parallelism. Every rank computes the same ``global_batch_size`` window indices for a step and keeps the
contiguous slice ``[r * B / dp, (r + 1) * B / dp)``. Concatenating the ranks' batches in rank order therefore
gives exactly the single-process batch, which is what the distributed-vs-single-process parity tests rely on.

Resuming. ``cursor`` names the next sample: ``(epoch, position in that epoch's permutation, seed)``. A loader
built with a saved cursor produces exactly the batches the original would have produced next, on any dp layout
whose ``global_batch_size`` is the same.

Legend: B = local batch (sequences on this rank), W = window length (seq_len + extra_tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from raymoe.data.dataset import TokenDataset
from raymoe.data.stream import ArrayStream, TokenStream


@dataclass(frozen=True, kw_only=True)
class Cursor:
    """Where the sample order stands: the next sample is ``permutation(seed, epoch)[position]``."""

    epoch: int = 0
    position: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.position < 0:
            raise ValueError(
                f"cursor epoch and position must be >= 0, got epoch={self.epoch}, position={self.position}"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Cursor:
        try:
            return cls(epoch=int(data["epoch"]), position=int(data["position"]), seed=int(data["seed"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a data cursor (need integer epoch, position, seed): {data!r}") from exc


class PackedBatches:
    """Endless iterator of ``(B_local, seq_len + extra_tokens)`` int64 batches; see the module docstring."""

    def __init__(
        self,
        dataset: TokenDataset | TokenStream | np.ndarray,
        *,
        seq_len: int,
        global_batch_size: int,
        extra_tokens: int = 1,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        cursor: Cursor | None = None,
    ) -> None:
        if isinstance(dataset, TokenDataset):
            dataset = dataset.stream  # lazy: row groups are read as windows need them
        tokens = dataset if isinstance(dataset, (TokenStream, ArrayStream)) else ArrayStream(dataset)
        _check_args(len(tokens), seq_len, global_batch_size, extra_tokens, dp_rank, dp_size)
        self.tokens = tokens
        self.seq_len = seq_len
        self.extra_tokens = extra_tokens
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_windows = (len(tokens) - extra_tokens) // seq_len
        cursor = cursor or Cursor(seed=seed)
        if cursor.seed != seed:
            raise ValueError(f"cursor was saved with seed={cursor.seed} but the loader has seed={seed}")
        if cursor.position >= self.num_windows:
            raise ValueError(
                f"cursor position {cursor.position} is past the {self.num_windows} windows of this dataset "
                f"(seq_len={seq_len}); was it saved for another dataset or seq_len?"
            )
        self._cursor = cursor
        self._permutation_cache: tuple[int, np.ndarray] | None = None

    @property
    def window_len(self) -> int:
        return self.seq_len + self.extra_tokens

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def cursor(self) -> Cursor:
        """The position of the next batch; save it with the checkpoint to resume exactly."""
        return self._cursor

    def next_batch(self) -> torch.Tensor:
        windows = self._global_windows()
        local = windows[self.dp_rank * self.local_batch_size : (self.dp_rank + 1) * self.local_batch_size]
        return torch.from_numpy(self.tokens.windows(local * self.seq_len, self.window_len).astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def _global_windows(self) -> np.ndarray:
        """The next global batch's window indices (identical on every rank); advances the cursor."""
        windows = np.empty(self.global_batch_size, dtype=np.int64)
        epoch, position, filled = self._cursor.epoch, self._cursor.position, 0
        while filled < self.global_batch_size:
            take = min(self.global_batch_size - filled, self.num_windows - position)
            windows[filled : filled + take] = self._permutation(epoch)[position : position + take]
            filled += take
            position += take
            if position == self.num_windows:
                epoch, position = epoch + 1, 0
        self._cursor = Cursor(epoch=epoch, position=position, seed=self._cursor.seed)
        return windows

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._permutation_cache is None or self._permutation_cache[0] != epoch:
            rng = np.random.default_rng([self._cursor.seed, epoch])
            self._permutation_cache = (epoch, rng.permutation(self.num_windows))
        return self._permutation_cache[1]

    def __repr__(self) -> str:
        return (
            f"PackedBatches(windows={self.num_windows:,}, seq_len={self.seq_len}, "
            f"extra_tokens={self.extra_tokens}, global_batch_size={self.global_batch_size}, "
            f"dp_rank={self.dp_rank}/{self.dp_size}, cursor={self.cursor})"
        )


def _check_args(
    num_tokens: int, seq_len: int, global_batch_size: int, extra_tokens: int, dp_rank: int, dp_size: int
) -> None:
    if seq_len < 1 or extra_tokens < 1 or global_batch_size < 1 or dp_size < 1:
        raise ValueError(
            f"seq_len, extra_tokens, global_batch_size and dp_size must be >= 1, got seq_len={seq_len}, "
            f"extra_tokens={extra_tokens}, global_batch_size={global_batch_size}, dp_size={dp_size}"
        )
    if global_batch_size % dp_size:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by dp_size={dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is out of range for dp_size={dp_size}")
    if num_tokens < seq_len + extra_tokens:
        raise ValueError(
            f"the dataset has {num_tokens} tokens, fewer than one window of seq_len + extra_tokens = "
            f"{seq_len} + {extra_tokens} = {seq_len + extra_tokens}"
        )
