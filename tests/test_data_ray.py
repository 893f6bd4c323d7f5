"""prepare-data on Ray Data: byte-identical to the single-process path for 1 and 4 blocks; errors named."""

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymoe.data import prepare_data, train_bpe

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (root / f"t{i}.txt").write_text(f"text file {i} ✓\n" * (40 * (i + 1)))
    (root / "empty.txt").write_text("")
    lines = [json.dumps({"text": f"json record {i} " * (i % 7 + 1)}) for i in range(300)]
    (root / "a.jsonl").write_text("\n".join(lines[:170]) + "\n\n")
    (root / "b.jsonl").write_text("\n".join(lines[170:]) + "\n")
    pq.write_table(pa.table({"body": [f"row {i} " * (i % 5 + 1) for i in range(200)]}), root / "c.parquet",
                   row_group_size=50)
    return root


def _files(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["text", pytest.param("jsonl", marks=pytest.mark.slow),
                                 pytest.param("parquet", marks=pytest.mark.slow)])
def test_same_bytes_for_1_and_4_blocks_and_the_local_path(ray_session, corpus, tmp_path, fmt):
    from raymoe.runtime.data_prep import prepare_data_ray

    options = {"text": {}, "jsonl": {"field": "text"}, "parquet": {"column": "body"}}[fmt]
    tokenizer = train_bpe([p.read_text() for p in corpus.glob("*.txt")], 300, progress=False)
    common = dict(tokenizer=tokenizer, shard_tokens=2000, row_group_tokens=500, holdout=0.4, progress=False,
                  **options)
    local = prepare_data([corpus], tmp_path / "local", **common)
    one = prepare_data_ray([corpus], tmp_path / "one", num_blocks=1, **common)
    prepare_data_ray([corpus], tmp_path / "four", num_blocks=4, **common)
    assert len(local.shards) > 1 and local.holdout is not None
    assert _files(tmp_path / "local") == _files(tmp_path / "one") == _files(tmp_path / "four")
    assert one == type(one)(**{**local.__dict__, "path": one.path})


def test_ray_path_names_bad_inputs(ray_session, tmp_path):
    from raymoe.runtime.data_prep import prepare_data_ray

    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n\n{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"a.jsonl line 4: field 'text' is missing or null"):
        prepare_data_ray([bad], tmp_path / "o", field="text", progress=False)
    (bad / "a.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"a.jsonl line 2: not valid JSON"):
        prepare_data_ray([bad], tmp_path / "o", field="text", progress=False)
    (bad / "x.txt").write_bytes(b"text\x00binary")
    with pytest.raises(ValueError, match=r"x.txt looks binary \(NUL byte at offset 4\)"):
        prepare_data_ray([bad], tmp_path / "o", progress=False)
    info = prepare_data_ray([bad / "x.txt", bad / "a.jsonl"], tmp_path / "o", on_binary="skip", progress=False,
                            patterns=["*"])
    assert info.num_documents == 1  # the binary file skipped, the JSONL file taken as plain text
    pq.write_table(pa.table({"n": [1, 2]}), bad / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet has no column 'body'"):
        prepare_data_ray([bad / "p.parquet"], tmp_path / "p", column="body", progress=False)
    (bad / "empty").mkdir()
    (bad / "empty" / "e.txt").write_text("")
    with pytest.raises(ValueError, match="every source document was empty"):
        prepare_data_ray([bad / "empty"], tmp_path / "e", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o"]  # no partial or temporary output


def test_cli_engine_ray(ray_session, corpus, tmp_path):
    from click.testing import CliRunner

    from raymoe.cli import main

    args = ["prepare-data", str(corpus), "--field", "text", "--quiet", "--holdout", "0.2"]
    ray_run = CliRunner().invoke(main, [*args, "--engine", "ray", "--blocks", "3", "--out", str(tmp_path / "r")])
    local_run = CliRunner().invoke(main, [*args, "--engine", "local", "--out", str(tmp_path / "l")])
    assert ray_run.exit_code == 0 and local_run.exit_code == 0, ray_run.output + local_run.output
    assert "holdout/" in ray_run.output and "tokens/s" in ray_run.output
    assert _files(tmp_path / "r") == _files(tmp_path / "l")
