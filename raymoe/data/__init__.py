"""Token datasets: byte tokenizer, Parquet shards, the embedded stdlib corpus, and a packed, resumable loader.

The path from text to batches::

    tok = train_bpe(texts, vocab_size=4096)                 # or load_tokenizer("tok/") / ByteTokenizer()
    prepare_data(["notes/", "book.txt"], "data/mine", tokenizer=tok)   # -> Parquet shards + manifest.json
    path = embedded_dataset()                               # or: the default corpus, built once and cached
    ds = TokenDataset(path)                                 # validated; tokens read lazily, row group by row group
    ds = load_dataset(cfg.data.path)                        # the same; "" means the embedded corpus
    batches = PackedBatches(ds, seq_len=128, global_batch_size=8, extra_tokens=2, dp_rank=r, dp_size=dp)
    x = batches.next_batch()                                # (8 // dp, 130) int64
    saved = batches.cursor.to_dict()                        # JSON; resume with cursor=Cursor.from_dict(saved)

Each module teaches its part: ``tokenizer`` (byte ids), ``bpe`` (Hugging Face BPE tokenizers), ``sources``
(input formats and policy), ``manifest`` and ``shards`` (the on-disk format, the held-out split), ``prepare``
(single-process preparation), ``corpus`` (the embedded corpus), ``stream`` (lazy row-group reads),
``dataset`` (loading), ``loader`` (packing, order, dp sharding, cursor). The Ray Data twin of ``prepare``
lives in ``raymoe/runtime/data_prep.py``.
"""

from raymoe.data.bpe import HFTokenizer, load_tokenizer, save_tokenizer, train_bpe
from raymoe.data.corpus import DEFAULT_BYTE_BUDGET, build_embedded_corpus, embedded_dataset
from raymoe.data.dataset import TokenDataset, check_vocab_fits, dataset_tokenizer, load_dataset
from raymoe.data.loader import Cursor, PackedBatches
from raymoe.data.manifest import DatasetInfo, ShardInfo, read_manifest
from raymoe.data.prepare import DEFAULT_SHARD_TOKENS, prepare_data
from raymoe.data.stream import TokenStream
from raymoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, Tokenizer, TokenizerInfo

__all__ = [
    "BOS_ID",
    "DEFAULT_BYTE_BUDGET",
    "DEFAULT_SHARD_TOKENS",
    "EOS_ID",
    "PAD_ID",
    "ByteTokenizer",
    "HFTokenizer",
    "Cursor",
    "DatasetInfo",
    "PackedBatches",
    "ShardInfo",
    "TokenDataset",
    "TokenStream",
    "Tokenizer",
    "TokenizerInfo",
    "build_embedded_corpus",
    "check_vocab_fits",
    "dataset_tokenizer",
    "embedded_dataset",
    "load_dataset",
    "load_tokenizer",
    "prepare_data",
    "read_manifest",
    "save_tokenizer",
    "train_bpe",
]
