"""Subword tokenizers: training, loading any tokenizer.json, ids, and the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from raymoe.cli import main
from raymoe.data import ByteTokenizer, Tokenizer, load_tokenizer, save_tokenizer, train_bpe
from raymoe.data.bpe import tokenizer_from_bytes

TEXTS = [
    "def add(a, b):\n    return a + b\n" * 20, "naïve café — 日本語 🚀\n" * 10, "for i in range(10):\n    print(i)\n"
] * 5


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS, 300, progress=False)


def test_training_is_deterministic_and_compresses(bpe):
    again = train_bpe(TEXTS, 300, progress=False)
    assert again.sha256 == bpe.sha256 and again.file_bytes() == bpe.file_bytes()
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == 300 and (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert bpe.name == "hf-bpe-300"
    ids = bpe.encode_array(TEXTS[0])
    assert ids.dtype == np.uint16 and ids[0] == 0 and ids[-1] == 1
    assert len(ids) < len(TEXTS[0].encode()) / 2  # merges learned


@pytest.mark.parametrize("text", ["", "hello", "naïve café — 日本語 🚀\n\ttabs", "  leading spaces", "\x00\x7f"])
def test_exact_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert [a.tolist() for a in bpe.encode_arrays([text, text])] == [ids, ids]


def test_special_token_text_is_never_a_special_id(bpe):
    ids = bpe.encode("x <|eos|> y <|bos|>", add_bos=False, add_eos=False)
    assert not {bpe.bos_id, bpe.eos_id, bpe.pad_id} & set(ids)
    assert bpe.decode(ids) == "x <|eos|> y <|bos|>"


def test_save_load_and_info(bpe, tmp_path):
    file = save_tokenizer(bpe, tmp_path / "tok")
    for where in (tmp_path / "tok", file):
        loaded = load_tokenizer(where)
        assert loaded.info == bpe.info and loaded.info.sha256 == bpe.sha256
        assert loaded.encode(TEXTS[1]) == bpe.encode(TEXTS[1])
    assert load_tokenizer("").info == load_tokenizer("byte").info == ByteTokenizer().info
    with pytest.raises(ValueError, match="does not match the sha256"):
        tokenizer_from_bytes(file.read_bytes() + b" ", bpe.info, source="x")


def test_a_published_style_tokenizer_works(tmp_path):
    """A GPT-2-like file: one <|endoftext|> special serves as BOS and EOS; other names via --bos/--eos."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "[X]"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    gpt2ish = load_tokenizer(tmp_path)
    assert gpt2ish.bos_id == gpt2ish.eos_id == gpt2ish.pad_id == 0
    assert gpt2ish.decode(gpt2ish.encode("hi there")) == "hi there"
    custom = load_tokenizer(tmp_path, bos="[X]")
    assert (custom.bos_id, custom.eos_id) == (1, 0)
    with pytest.raises(ValueError, match=r"no special token '<s>' for BOS; its special tokens are \['<\|endoftext"):
        load_tokenizer(tmp_path, bos="<s>")


def test_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="directory .* has no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="nope.json does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{broken")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_tokenizer(bad)
    specials = [{"id": 0, "content": "<s>", "special": True}, {"id": 1, "content": "</s>", "special": True}]
    bad.write_text(json.dumps({"added_tokens": specials, "model": {}}))
    with pytest.raises(ValueError, match="bad.json does not parse as a Hugging Face tokenizer.json"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"model": {}}))
    with pytest.raises(ValueError, match="bad.json has no added_tokens list"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"added_tokens": [{"id": 0, "content": "<unk>", "special": True}]}))
    with pytest.raises(ValueError, match=r"cannot tell its BOS token .* name one with --bos-token"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="vocab_size 100 is too small: a byte-level BPE needs >= 259"):
        train_bpe(TEXTS, 100)
    with pytest.raises(ValueError, match="the corpus is empty"):
        train_bpe([], 300, progress=False)


def test_train_tokenizer_command(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    result = CliRunner().invoke(main, ["train-tokenizer", str(src), "--field", "text", "--vocab-size", "300",
                                       "--out", str(tmp_path / "tok"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "hf-bpe-300, vocab 300 (bos 0, eos 1, pad 2)" in result.output
    assert load_tokenizer(tmp_path / "tok").vocab_size == 300
    result = CliRunner().invoke(main, ["train-tokenizer", str(src), "--field", "text", "--vocab-size", "5000",
                                       "--out", str(tmp_path / "tok2"), "--quiet"])
    assert result.exit_code == 0 and "asked for 5000" in result.output
    result = CliRunner().invoke(main, ["train-tokenizer", str(src), "--vocab-size", "320", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "no files matching ['*.txt']" in result.output
