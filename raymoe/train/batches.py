"""Where a trainer's token batches come from: the configured dataset, or the embedded corpus."""

from __future__ import annotations

from raymoe.config import Config


def open_batches(config: Config, *, dp_rank: int = 0, dp_size: int = 1, cursor=None):
    """A ``PackedBatches`` over ``data.path`` (or the embedded corpus) with MTP's extra tokens per sample."""
    from raymoe.data import PackedBatches, load_dataset

    dataset = load_dataset(config.data.path)
    if dataset.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"dataset {str(dataset.path)!r} has vocab_size {dataset.vocab_size} > "
            f"model.vocab_size {config.model.vocab_size}"
        )
    return PackedBatches(
        dataset,
        seq_len=config.data.seq_len,
        global_batch_size=config.data.batch_size,
        extra_tokens=1 + config.mtp.depth,
        seed=config.data.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        cursor=cursor,
    )
