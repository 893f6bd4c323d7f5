"""Where a trainer's token batches come from: the configured dataset, or the embedded corpus."""

from __future__ import annotations

from raymoe.config import Config


def open_batches(config: Config, *, dp_rank: int = 0, dp_size: int = 1, cursor=None):
    """A ``PackedBatches`` over ``data.path`` (or the embedded corpus) with MTP's extra tokens per sample."""
    from raymoe.data import PackedBatches, check_vocab_fits, load_dataset

    check_vocab_fits(config.data.path, config.model.vocab_size)
    dataset = load_dataset(config.data.path)
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
