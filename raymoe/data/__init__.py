"""Token datasets: byte tokenizer, Parquet shards, the embedded stdlib corpus, and a packed, resumable loader.

The path from text to batches::

    prepare_data(["notes/", "book.txt"], "data/mine")      # text files -> Parquet shards + manifest.json
    path = embedded_dataset()                               # or: the default corpus, built once and cached
    ds = TokenDataset(path)                                 # validated, one flat uint16 token stream
    ds = load_dataset(cfg.data.path)                        # the same; "" means the embedded corpus
    batches = PackedBatches(ds, seq_len=128, global_batch_size=8, extra_tokens=2, dp_rank=r, dp_size=dp)
    x = batches.next_batch()                                # (8 // dp, 130) int64
    saved = batches.cursor.to_dict()                        # JSON; resume with cursor=Cursor.from_dict(saved)

Each module teaches its part: ``tokenizer`` (ids), ``shards`` (the on-disk format), ``prepare`` (input
policy), ``corpus`` (the embedded corpus), ``dataset`` (loading), ``loader`` (packing, order, dp sharding,
cursor).
"""

from raymoe.data.corpus import DEFAULT_BYTE_BUDGET, build_embedded_corpus, embedded_dataset
from raymoe.data.dataset import TokenDataset, load_dataset
from raymoe.data.loader import Cursor, PackedBatches
from raymoe.data.prepare import DEFAULT_SHARD_TOKENS, prepare_data
from raymoe.data.shards import DatasetInfo, ShardInfo, read_manifest
from raymoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, Tokenizer

__all__ = [
    "BOS_ID",
    "DEFAULT_BYTE_BUDGET",
    "DEFAULT_SHARD_TOKENS",
    "EOS_ID",
    "PAD_ID",
    "ByteTokenizer",
    "Cursor",
    "DatasetInfo",
    "PackedBatches",
    "ShardInfo",
    "TokenDataset",
    "Tokenizer",
    "build_embedded_corpus",
    "embedded_dataset",
    "load_dataset",
    "prepare_data",
    "read_manifest",
]
