"""Byte tokenizer: ids layout, exact round trips (non-ASCII included), special-token handling."""

import numpy as np
import pytest

from raymoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, Tokenizer, token_dtype

TEXTS = ["", "hello", "naïve café — 日本語 🚀\n\ttabs", "\x00\x7f\u00ff\U0010ffff", "line1\r\nline2\n"]


def test_ids_layout():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS_ID, EOS_ID, PAD_ID) == (256, 257, 258)
    assert isinstance(tok, Tokenizer)
    assert tok.encode("Ab") == [256, 65, 98, 257]
    assert tok.encode("Ab", add_bos=False) == [65, 98, 257]
    assert tok.encode("Ab", add_eos=False) == [256, 65, 98]
    assert tok.encode("é", add_bos=False, add_eos=False) == [0xC3, 0xA9]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    arr = tok.encode_array(text)
    assert arr.dtype == np.uint16 and arr.tolist() == ids
    assert tok.decode(arr) == text


def test_decode_drops_specials_and_replaces_cut_characters():
    tok = ByteTokenizer()
    assert tok.decode([BOS_ID, 104, 105, EOS_ID, PAD_ID, BOS_ID, 33]) == "hi!"
    cut = tok.encode("日", add_bos=False, add_eos=False)[:2]  # a 3-byte character cut in two
    assert tok.decode(cut) == "\ufffd"
    with pytest.raises(ValueError, match="token id 260"):
        tok.decode([1, 260])


def test_token_dtype():
    assert token_dtype(260) == np.uint16
    assert token_dtype(129280) == np.uint32
