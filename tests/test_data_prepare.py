"""prepare_data and the shard format: round trip to text, determinism, input policy, corruption detection."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymoe.data import ByteTokenizer, PackedBatches, TokenDataset, prepare_data, read_manifest
from raymoe.data.tokenizer import BOS_ID, EOS_ID

TEXTS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 7,
    "sub/b.txt": "Ünïcödé: naïve café, 日本語のテキスト, emoji 🚀🎉 and math ∑ x² ≤ ∞.\n" * 5,
    "sub/deeper/c.txt": "".join(f"line {i}: {'abc' * (i % 7)}\n" for i in range(60)),
    "d.txt": "short\n",
}


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "src"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "skip.md").write_text("not matched by *.txt")
    (root / "empty.txt").write_text("")  # empty files inside a directory are skipped
    return root


def _segments(ids) -> list[bytes]:
    """Split a window at BOS/EOS into the byte runs between them."""
    out, run = [], []
    for i in ids:
        if i in (BOS_ID, EOS_ID):
            out.append(bytes(run))
            run = []
        else:
            run.append(int(i))
    out.append(bytes(run))
    return [s for s in out if s]


def test_round_trip_text_parquet_batches_text(corpus, tmp_path):
    info = prepare_data([corpus], tmp_path / "ds", shard_tokens=400, progress=False)
    assert info.num_documents == len(TEXTS) and len(info.shards) > 1  # small shards: several files
    ds = TokenDataset(tmp_path / "ds")
    tok = ByteTokenizer()
    # Documents come back exactly, in sorted path order, with their sources recorded.
    expected = [TEXTS[name] for name in sorted(TEXTS)]
    assert [tok.decode(ds.document(i)) for i in range(ds.num_documents)] == expected
    sources = [s for shard in info.shards for s in pq.read_table(ds.path / shard.file)["source"].to_pylist()]
    assert sources == [str(corpus / name) for name in sorted(TEXTS)]
    assert ds.num_tokens == sum(len(t.encode()) + 2 for t in TEXTS.values()) == info.num_tokens

    seq_len, extra = 16, 2
    batches = PackedBatches(ds, seq_len=seq_len, global_batch_size=4, extra_tokens=extra)
    steps = -(-batches.num_windows // 4)  # the last step straddles into epoch 1
    windows = np.concatenate([batches.next_batch().numpy() for _ in range(steps)])
    assert windows.shape == (steps * 4, seq_len + extra)
    windows = windows[: batches.num_windows]  # exactly epoch 0
    # Every byte run of a window (between BOS/EOS separators) is a piece of one source text.
    source_bytes = [t.encode() for t in TEXTS.values()]
    for window in windows:
        segments = _segments(window)
        assert segments and all(any(seg in text for text in source_bytes) for seg in segments)
    # One epoch visits each window of the stream exactly once: window w = tokens[w*T : w*T + T + extra].
    starts = range(0, batches.num_windows * seq_len, seq_len)
    expected_windows = sorted(tuple(ds.tokens[s : s + seq_len + extra]) for s in starts)
    assert sorted(map(tuple, windows)) == expected_windows
    # ...and that stream is the documents' encodings back to back.
    assert ds.tokens.tolist() == [i for text in expected for i in tok.encode(text)]


def test_preparation_is_deterministic_and_sharding_does_not_change_the_stream(corpus, tmp_path):
    one = prepare_data([corpus], tmp_path / "one", progress=False)
    again = prepare_data([corpus], tmp_path / "again", progress=False)
    many = prepare_data([corpus], tmp_path / "many", shard_tokens=100, progress=False)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in again.shards]
    assert len(one.shards) == 1 and len(many.shards) == 3  # [a] [d, b] [c]: docs are never split
    assert np.array_equal(TokenDataset(one.path).tokens, TokenDataset(many.path).tokens)
    ids = [i for s in many.shards for i in pq.read_table(many.path / s.file)["doc_id"].to_pylist()]
    assert ids == list(range(len(TEXTS)))


def test_schema_and_manifest(corpus, tmp_path):
    info = prepare_data([corpus / "a.txt", corpus / "d.txt"], tmp_path / "ds", progress=False)
    table = pq.read_table(tmp_path / "ds" / info.shards[0].file)
    assert table.schema.names == ["doc_id", "source", "tokens"]
    tokens_type = table.schema.field("tokens").type
    assert pa.types.is_list(tokens_type) and tokens_type.value_type == pa.uint16()
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert manifest["tokenizer"] == {"name": "byte", "vocab_size": 260, "bos_id": 256, "eos_id": 257, "pad_id": 258,
                                     "file": None, "sha256": None}
    assert manifest["shards"][0]["row_group_tokens"] == [manifest["num_tokens"]]
    assert manifest["num_tokens"] == len(TEXTS["a.txt"]) + len(TEXTS["d.txt"]) + 4
    assert read_manifest(tmp_path / "ds") == info
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_input_errors_name_the_problem(corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="at least one source"):
        prepare_data([], out)
    with pytest.raises(ValueError, match="nope.txt does not exist"):
        prepare_data([corpus / "nope.txt"], out)
    with pytest.raises(ValueError, match=r"no files matching \['\*.rst'\] under directory"):
        prepare_data([corpus], out, patterns=["*.rst"])
    (corpus / "empty2.txt").write_text("")
    with pytest.raises(ValueError, match="empty2.txt is empty"):
        prepare_data([corpus / "empty2.txt"], out)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "e.txt").write_text("")
    with pytest.raises(ValueError, match="every source document was empty"):
        prepare_data([blank], out, progress=False)
    with pytest.raises(ValueError, match="on_binary must be one of"):
        prepare_data([corpus], out, on_binary="ignore")
    with pytest.raises(ValueError, match="shard_tokens must be"):
        prepare_data([corpus], out, shard_tokens=0, progress=False)
    assert not out.exists()


def test_binary_and_undecodable_files(corpus, tmp_path):
    (corpus / "z_bin.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(ValueError, match=r"z_bin.txt looks binary \(NUL byte at offset 4\)"):
        prepare_data([corpus], tmp_path / "out", progress=False)
    # The failure came after other documents were written: nothing may be left behind.
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not valid UTF-8 \(byte offset 3"):
        prepare_data([latin1], tmp_path / "out", progress=False)
    info = prepare_data([corpus, latin1], tmp_path / "out", on_binary="skip", progress=False)
    assert info.num_documents == len(TEXTS)


def test_existing_output_needs_overwrite(corpus, tmp_path):
    out = tmp_path / "ds"
    prepare_data([corpus / "a.txt"], out, progress=False)
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        prepare_data([corpus / "d.txt"], out, progress=False)
    info = prepare_data([corpus / "d.txt"], out, overwrite=True, progress=False)
    assert TokenDataset(out).num_tokens == info.num_tokens == len("short\n") + 2
    # overwrite replaces a dataset, never a directory of other files.
    with pytest.raises(ValueError, match="refusing to overwrite .*src: it holds files but is not a dataset"):
        prepare_data([corpus / "d.txt"], corpus, overwrite=True, progress=False)
    assert (corpus / "a.txt").is_file()


@pytest.fixture
def dataset(corpus, tmp_path) -> Path:
    prepare_data([corpus], tmp_path / "ds", shard_tokens=300, progress=False)
    return tmp_path / "ds"


def test_corrupt_shard_is_named(dataset):
    shard = dataset / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard .*shard-00001.parquet is corrupt: its sha256"):
        TokenDataset(dataset)


def test_truncated_and_missing_shards_are_named(dataset):
    shard = dataset / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"shard-00000.parquet is corrupt: \d+ bytes, manifest says"):
        TokenDataset(dataset)
    shard.unlink()
    with pytest.raises(ValueError, match="shard-00000.parquet listed in manifest.json is missing"):
        TokenDataset(dataset)


def test_bad_manifest_is_named(dataset, tmp_path):
    manifest = dataset / "manifest.json"
    good = json.loads(manifest.read_text())
    bad = dict(good, num_tokens=good["num_tokens"] + 1)
    manifest.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="do not add up to num_tokens"):
        TokenDataset(dataset)
    manifest.write_text(json.dumps(dict(good, format="something-else")))
    with pytest.raises(ValueError, match="expected format 'raymoe.tokens'"):
        TokenDataset(dataset)
    manifest.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        TokenDataset(dataset)
    manifest.unlink()
    with pytest.raises(ValueError, match="not a raymoe dataset: manifest.json is missing"):
        TokenDataset(dataset)
    with pytest.raises(ValueError, match="does not exist"):
        TokenDataset(tmp_path / "nowhere")
