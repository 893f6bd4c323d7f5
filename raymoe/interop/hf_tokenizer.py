"""Our byte tokenizer (``raymoe.data.tokenizer``) as Hugging Face ``tokenizer.json`` files.

A byte-level BPE with no merges is exactly "one token per UTF-8 byte": the GPT-2 byte-to-character table makes
every byte a printable vocabulary entry, ids 0..255 are the byte values, and the four special tokens take 256..259
as ours do. Encoding prepends BOS (a document starts with it in training; EOS ends it). When runs carry their own
tokenizer.json, the export copies that file instead of calling ``write_byte_tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

from raymoe.data.tokenizer import BOS_ID, EOS_ID, NUM_BYTES, PAD_ID, RESERVED_ID

SPECIALS = {"<bos>": BOS_ID, "<eos>": EOS_ID, "<pad>": PAD_ID, "<reserved>": RESERVED_ID}


def _byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character table, indexed by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(NUM_BYTES):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(NUM_BYTES + extra)
            extra += 1
    return [chars[b] for b in range(NUM_BYTES)]


def write_byte_tokenizer(out_dir: Path, *, max_seq_len: int) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for the byte tokenizer into ``out_dir``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {char: b for b, char in enumerate(_byte_chars())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])  # ids 256.. in this order
    assert [tokenizer.token_to_id(t) for t in SPECIALS] == list(SPECIALS.values())
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                             special_tokens=[("<bos>", BOS_ID)])
    out_dir = Path(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
