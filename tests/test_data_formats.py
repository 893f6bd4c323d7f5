"""JSONL and Parquet inputs, the tokenizer recorded with the data, the held-out split, atomic failure, and the
tokenizer travelling into training checks and checkpoints."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymoe.data import ByteTokenizer, TokenDataset, check_vocab_fits, prepare_data, read_manifest, train_bpe
from raymoe.data.provenance import INFO_FILE, export_metadata, read_tokenizer, write_tokenizer_files

RECORDS = [{"text": f"record {i}: " + "lorem ipsum " * (i % 5 + 1), "id": i} for i in range(40)]


@pytest.fixture
def jsonl(tmp_path) -> Path:
    root = tmp_path / "jsonl"
    root.mkdir()
    (root / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:25]) + "\n\n")
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[25:]))
    return root


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([r["text"] for r in RECORDS] * 3, 280, progress=False)


def test_jsonl_records_are_documents(jsonl, tmp_path):
    info = prepare_data([jsonl], tmp_path / "ds", field="text", progress=False)
    ds = TokenDataset(tmp_path / "ds")
    assert info.num_documents == len(RECORDS)
    assert ByteTokenizer().decode(ds.document(26)) == RECORDS[26]["text"]
    sources = pq.read_table(tmp_path / "ds" / info.shards[0].file).column("source").to_pylist()
    assert sources[:2] == [f"{jsonl / 'a.jsonl'}#0", f"{jsonl / 'a.jsonl'}#1"] and sources[25].endswith("b.jsonl#0")


def test_parquet_column_rows_are_documents(tmp_path):
    pq.write_table(pa.table({"body": [r["text"] for r in RECORDS], "n": list(range(40))}), tmp_path / "in.parquet")
    info = prepare_data([tmp_path / "in.parquet"], tmp_path / "ds", column="body", progress=False)
    assert info.num_documents == 40
    assert ByteTokenizer().decode(TokenDataset(tmp_path / "ds").document(3)) == RECORDS[3]["text"]


def test_bad_inputs_name_file_line_and_column(jsonl, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"txt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 4: field 'text' is missing or null"):
        prepare_data([bad], tmp_path / "o1", field="text", progress=False)
    bad.write_text('{"text": "ok"}\n{"text": 7}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: field 'text' holds a int, not text"):
        prepare_data([bad], tmp_path / "o1", field="text", progress=False)
    bad.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        prepare_data([bad], tmp_path / "o1", field="text", progress=False)
    pq.write_table(pa.table({"body": ["a", None], "n": [1, 2]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet has no column 'text'; its columns are \['body', 'n'\]"):
        prepare_data([tmp_path / "p.parquet"], tmp_path / "o1", column="text", progress=False)
    with pytest.raises(ValueError, match=r"p.parquet column 'n' has type int64, not a string"):
        prepare_data([tmp_path / "p.parquet"], tmp_path / "o1", column="n", progress=False)
    with pytest.raises(ValueError, match=r"p.parquet row 1: column 'body' is missing or null"):
        prepare_data([tmp_path / "p.parquet"], tmp_path / "o1", column="body", progress=False)
    with pytest.raises(ValueError, match="not both"):
        prepare_data([jsonl], tmp_path / "o1", field="text", column="text", progress=False)
    assert not list(tmp_path.glob("o1*")) and not list(tmp_path.glob(".o1*"))  # nothing half-written left


def test_tokenizer_is_recorded_and_shipped(jsonl, tmp_path, bpe):
    info = prepare_data([jsonl], tmp_path / "ds", field="text", tokenizer=bpe, progress=False)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    shipped = (tmp_path / "ds" / "tokenizer.json").read_bytes()
    assert manifest["tokenizer"] == {"name": "hf-bpe-280", "vocab_size": 280, "bos_id": 0, "eos_id": 1, "pad_id": 2,
                                     "file": "tokenizer.json", "sha256": hashlib.sha256(shipped).hexdigest()}
    assert read_tokenizer_of_dataset(tmp_path / "ds").decode(TokenDataset(tmp_path / "ds").document(5)) == \
        RECORDS[5]["text"]
    assert info.tokenizer == bpe.info


def read_tokenizer_of_dataset(path):
    from raymoe.data.bpe import tokenizer_from_bytes

    info = read_manifest(path).tokenizer
    return tokenizer_from_bytes((path / info.file).read_bytes(), info, source=str(path))


def test_holdout_split_is_an_ordinary_dataset(jsonl, tmp_path):
    info = prepare_data([jsonl], tmp_path / "ds", field="text", holdout=0.25, progress=False)
    held = TokenDataset(tmp_path / "ds" / "holdout")
    train = TokenDataset(tmp_path / "ds")
    assert info.holdout.fraction == 0.25 and info.holdout.dir == "holdout"
    assert held.num_documents + train.num_documents == len(RECORDS) and 3 <= held.num_documents <= 17
    sources = lambda d: {s for f in d.glob("shard-*.parquet") for s in pq.read_table(f).column("source").to_pylist()}  # noqa: E731
    assert not sources(tmp_path / "ds") & sources(tmp_path / "ds" / "holdout")
    again = prepare_data([jsonl], tmp_path / "again", field="text", holdout=0.25, progress=False)
    assert again.shards == info.shards  # deterministic: same documents held out, same bytes
    # Adding a file never moves an existing document across the split.
    (jsonl / "c.jsonl").write_text(json.dumps({"text": "one more"}) + "\n")
    more = prepare_data([jsonl], tmp_path / "more", field="text", holdout=0.25, progress=False)
    assert sources(tmp_path / "ds" / "holdout") <= sources(tmp_path / "more" / "holdout")
    assert more.num_documents + TokenDataset(tmp_path / "more" / "holdout").num_documents == len(RECORDS) + 1
    with pytest.raises(ValueError, match=r"holdout=1e-09 put 0 of 40 documents in the held-out split"):
        prepare_data([jsonl / "a.jsonl", jsonl / "b.jsonl"], tmp_path / "none", field="text", holdout=1e-9,
                     progress=False)
    with pytest.raises(ValueError, match=r"holdout must be a fraction in \[0, 1\), got 1.5"):
        prepare_data([jsonl], tmp_path / "x", field="text", holdout=1.5, progress=False)


def test_training_refuses_a_model_smaller_than_the_tokenizer(jsonl, tmp_path, bpe):
    prepare_data([jsonl], tmp_path / "ds", field="text", tokenizer=bpe, progress=False)
    with pytest.raises(ValueError, match=r"model.vocab_size=260 is smaller than the vocab_size 280 of the "
                                         r"hf-bpe-280 tokenizer of dataset .*ds'; set model.vocab_size=280"):
        check_vocab_fits(str(tmp_path / "ds"), 260)
    assert check_vocab_fits(str(tmp_path / "ds"), 280).sha256 == bpe.sha256
    assert check_vocab_fits("", 260).name == "byte"

    from raymoe.config import load_config
    from raymoe.runtime.driver import Driver

    config = load_config("debug", [f"data.path={tmp_path / 'ds'}", "model.vocab_size=260"])
    with pytest.raises(ValueError, match="model.vocab_size=260 is smaller than the vocab_size 280"):
        Driver(config)  # before any worker (or Ray) starts


def test_checkpoints_and_exports_carry_the_tokenizer(jsonl, tmp_path, bpe):
    prepare_data([jsonl], tmp_path / "ds", field="text", tokenizer=bpe, progress=False)
    ckpt = tmp_path / "step"
    ckpt.mkdir()
    write_tokenizer_files(ckpt, f"data:\n  path: {tmp_path / 'ds'}\n  seq_len: 8\n")
    assert (ckpt / "tokenizer.json").read_bytes() == bpe.file_bytes()
    restored = read_tokenizer(ckpt)
    assert restored.info == bpe.info and restored.encode("lorem") == bpe.encode("lorem")
    meta = export_metadata(ckpt)
    assert json.loads(meta["raymoe_tokenizer_info"])["sha256"] == bpe.sha256
    assert meta["raymoe_tokenizer"].encode() == bpe.file_bytes()
    byte = tmp_path / "byte"
    byte.mkdir()
    write_tokenizer_files(byte, "data:\n  path: ''\n")
    assert sorted(p.name for p in byte.iterdir()) == [INFO_FILE] and read_tokenizer(byte).info == ByteTokenizer().info


def test_local_training_checkpoint_carries_the_tokenizer(jsonl, tmp_path, bpe):
    """End to end: a short --engine local run on a BPE dataset saves a checkpoint holding the tokenizer."""
    from click.testing import CliRunner

    from raymoe.cli import main

    prepare_data([jsonl], tmp_path / "ds", field="text", tokenizer=bpe, progress=False)
    args = ["train", "--preset", "debug", "--engine", "local", "--steps", "2", "--checkpoint-every", "2", "--out",
            str(tmp_path / "run"), f"data.path={tmp_path / 'ds'}", "data.seq_len=16"]
    refused = CliRunner().invoke(main, [*args, "model.vocab_size=260"])
    assert refused.exit_code != 0 and "model.vocab_size=260 is smaller than the vocab_size 280" in refused.output
    result = CliRunner().invoke(main, [*args, "model.vocab_size=280"])
    assert result.exit_code == 0, result.output
    (step,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    assert read_tokenizer(step).info == bpe.info
    assert np.array_equal(read_tokenizer(step).encode_array("ipsum"), bpe.encode_array("ipsum"))
