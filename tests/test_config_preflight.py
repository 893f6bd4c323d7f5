"""Nothing lost, nothing hangs (issue 21): a refused run writes nothing, a fresh run never destroys an earlier
run's history, and everything that can be checked is checked before the run directory is touched."""

import json
import time

import pytest
from click.testing import CliRunner

from raymoe.checkpoint import resolve_checkpoint
from raymoe.cli import main
from raymoe.config import load_config
from raymoe.train.preflight import check_memory, check_writable, estimate_memory
from raymoe.train.run_dir import RunDir, earlier_run


def _train(*args: str):
    return CliRunner().invoke(main, ["train", "--preset", "debug", *args])


def _one_line_error(result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _tree(path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_refused_fresh_run_never_touches_an_earlier_runs_directory(tmp_path):
    run = tmp_path / "D"
    done = _train("--engine", "local", "--steps", "2", "--checkpoint-every", "2", "--out", str(run))
    assert done.exit_code == 0, done.output
    before = _tree(run)
    assert "metrics.jsonl" in before and "checkpoints/step-00000002/manifest.json" in before

    # The reproduction: a fresh run pointed at it with a bad data.path emptied metrics.jsonl.
    error = _one_line_error(_train("--engine", "local", "--steps", "2", "--out", str(run), "data.path=/nonexistent"))
    assert f"run.out_dir '{run}' already holds a run" in error and "--overwrite" in error
    # ... refused the same way when nothing else is wrong, and for the Ray engine before Ray starts.
    _one_line_error(_train("--engine", "local", "--steps", "2", "--out", str(run)))
    _one_line_error(_train("--steps", "2", "--out", str(run)))
    # --overwrite does not get past the other checks: the data is still checked before anything moves.
    error = _one_line_error(_train("--engine", "local", "--steps", "2", "--out", str(run), "--overwrite",
                                   "data.path=/nonexistent"))
    assert "data.path='/nonexistent'" in error
    assert _tree(run) == before
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert resolve_checkpoint(run).name == "step-00000002"

    # With --overwrite the earlier run moves, whole, to earlier-1/ and stays resumable from there.
    again = _train("--engine", "local", "--steps", "1", "--out", str(run), "--overwrite")
    assert again.exit_code == 0, again.output
    assert {f"earlier-1/{name}": size for name, size in before.items()} == {
        k: v for k, v in _tree(run).items() if k.startswith("earlier-1/")}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert resolve_checkpoint(run / "earlier-1").name == "step-00000002"
    assert earlier_run(run) == ["config.yaml", "loss.png", "metrics.jsonl", "metrics.parquet"]


def test_run_dir_refuses_a_directory_holding_a_run_unless_overwrite(tmp_path):
    config = load_config("debug")
    (tmp_path / "notes.txt").write_text("mine")  # unrelated files do not make a run
    first = RunDir(tmp_path, config)
    first.log({"step": 0, "loss": 1.0})
    first.close()
    with pytest.raises(ValueError, match="already holds a run"):
        RunDir(tmp_path, config)
    second = RunDir(tmp_path, config, overwrite=True)
    second.close()
    third = RunDir(tmp_path, config, overwrite=True)
    third.close()
    assert (tmp_path / "earlier-1" / "metrics.jsonl").read_text() == json.dumps({"step": 0, "loss": 1.0}) + "\n"
    assert (tmp_path / "earlier-2" / "config.yaml").is_file() and (tmp_path / "notes.txt").read_text() == "mine"
    assert RunDir(tmp_path, config, resume_step=0).path == tmp_path  # --resume continues what is there


@pytest.mark.parametrize("override, message", [
    ("model.vocab_size=1000000000000", r"model.vocab_size=1000000000000, .* need at least .* GiB per worker"),
    ("model.moe_inter_dim=100000000000", r"the model does not fit: .*model.moe_inter_dim=100000000000"),
    ("model.kv_lora_rank=100000000000", r"the model does not fit: .*model.kv_lora_rank=100000000000"),
    ("data.batch_size=8000000000000", r"the model does not fit: .* but this machine has"),
])
def test_sizes_that_cannot_fit_are_refused_with_the_planners_estimate(tmp_path, override, message):
    for engine in ("local", "ray"):
        error = _one_line_error(_train("--engine", engine, "--out", str(tmp_path / "r"), override))
        assert pytest.importorskip("re").search(message, error), error
    assert not (tmp_path / "r").exists()


def test_memory_estimate_is_the_planners_and_counts_every_local_worker():
    config = load_config("debug", ["parallel.pp=2", "schedule.name=1f1b", "schedule.num_microbatches=4"])
    estimate = estimate_memory(config, engine="ray")
    assert estimate.num_workers == 2 and 0 < estimate.state_bytes < estimate.per_worker_bytes
    with pytest.raises(ValueError, match=r"x 2 worker\(s\)"):
        check_memory(config, engine="ray", available_bytes=estimate.per_worker_bytes)  # one fits, two do not
    check_memory(config, engine="ray", workers_on_this_machine=False, available_bytes=estimate.per_worker_bytes)


@pytest.mark.parametrize("checkpoint_dir, message", [
    ("/proc/nope", r"run.checkpoint_dir '/proc/nope' is not usable: nothing can be created in '/proc'"),
    ("/tmp/" + "c" * 300, r"run.checkpoint_dir: the name 'c+'\.\.\. is 300 bytes long"),
])
def test_unusable_checkpoint_dirs_are_named(tmp_path, checkpoint_dir, message):
    error = _one_line_error(_train("--engine", "local", "--out", str(tmp_path / "r"),
                                   f"run.checkpoint_dir={checkpoint_dir}"))
    assert pytest.importorskip("re").search(message, error), error
    assert not (tmp_path / "r").exists()


def test_check_writable_refuses_files_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_writable(tmp_path / "file", "run.out_dir")
    with pytest.raises(ValueError, match="cannot be created: .* is not a directory"):
        check_writable(tmp_path / "file" / "below", "run.out_dir")
    check_writable(tmp_path / "new" / "deeper", "run.out_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cuda_with_the_local_engine_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    error = _one_line_error(_train("--engine", "local", "--out", str(tmp_path / "r"), "parallel.device=cuda"))
    assert "parallel.device=cuda with --engine local" in error and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args", [["--address", "bogus:1"], ["run.ray_address=127.0.0.1:1"]])
def test_an_address_nobody_answers_fails_in_seconds_naming_it(tmp_path, args):
    start = time.monotonic()
    error = _one_line_error(_train("--out", str(tmp_path / "r"), *args))
    assert time.monotonic() - start < 10
    assert ("'bogus:1'" in error or "'127.0.0.1:1'" in error) and "no Ray head answers there" in error
    assert not (tmp_path / "r").exists()


def test_a_bogus_ray_address_variable_is_named_too(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "bogus:1")
    error = _one_line_error(_train("--out", str(tmp_path / "r")))
    assert "RAY_ADDRESS='bogus:1': no Ray head answers there" in error
    monkeypatch.setenv("RAY_ADDRESS", "nonsense")
    assert "RAY_ADDRESS must be" in _one_line_error(_train("--out", str(tmp_path / "r")))


def test_a_malformed_data_manifest_names_the_field(tmp_path):
    from raymoe.data.prepare import prepare_data

    data = tmp_path / "data"
    prepare_data([_text_file(tmp_path)], data)
    manifest = json.loads((data / "manifest.json").read_text())
    for mutate, field in [(lambda m: m.update(num_tokens="lots"), "'num_tokens' must be a non-negative integer"),
                          (lambda m: m["shards"][0].update(num_bytes=None), "'shards[0].num_bytes' must be"),
                          (lambda m: m["tokenizer"].pop("vocab_size"), "'tokenizer.vocab_size' is missing"),
                          (lambda m: m.update(shards={}), "'shards' must be a JSON list"),
                          (lambda m: m.update(num_documents=True), "'num_documents' must be a non-negative")]:
        broken = json.loads(json.dumps(manifest))
        mutate(broken)
        (data / "manifest.json").write_text(json.dumps(broken))
        error = _one_line_error(_train("--engine", "local", "--out", str(tmp_path / "r"), f"data.path={data}"))
        assert field in error, error
    assert not (tmp_path / "r").exists()


def _text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("def hello():\n    return 'world'\n" * 200)
    return path


def test_too_many_workers_for_the_cluster_are_refused_before_the_run_directory(ray_session, tmp_path):
    from raymoe.runtime.launch import train_ray

    config = load_config("debug", ["parallel.pp=4", "parallel.dp=4", "data.batch_size=16",
                                   "schedule.num_microbatches=4", "schedule.name=1f1b"])
    with pytest.raises(ValueError, match=r"pp=4 x dp=4 = 16 workers need 16 CPUs .* the Ray cluster has 8"):
        train_ray(config, out_dir=str(tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.gpu
def test_cuda_with_the_local_engine_trains_on_cuda(tmp_path):
    import math

    import torch

    from raymoe.train import train_local

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    records = train_local(load_config("debug", ["run.steps=2", "parallel.device=cuda"]),
                          out_dir=str(tmp_path / "r"), progress=False)
    assert [r["step"] for r in records] == [0, 1] and all(math.isfinite(r["loss"]) for r in records)


def test_a_local_ray_keeps_its_dashboard_on_loopback_and_a_joined_one_passes_nothing_local(monkeypatch):
    import ray

    from raymoe.runtime import launch

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launch.init_ray("", num_cpus=3)
    assert calls[-1]["dashboard_host"] == "127.0.0.1" and calls[-1]["num_cpus"] == 3
    monkeypatch.setattr(launch, "check_address", lambda *a, **k: None)  # no head needed for the argument check
    launch.init_ray("auto")
    assert calls[-1] == {"address": "auto", "log_to_driver": True}
