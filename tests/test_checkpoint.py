"""Checkpoint files, manifests, shards and stores without Ray: atomicity, keep-last-N, safe loading, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
from dataclasses import asdict

import pytest
import torch

from raymoe.checkpoint import (
    CheckpointStore,
    Layout,
    Manifest,
    ShardEntry,
    copy_parameters,
    load_shard,
    resolve_checkpoint,
    save_shard,
)
from raymoe.checkpoint.compat import check_compatible, check_steps, config_of
from raymoe.checkpoint.files import write_atomic, write_text_atomic
from raymoe.config import load_config, to_yaml
from raymoe.train.run_dir import RunDir


def _manifest(step: int, *, shards: list[ShardEntry] | None = None, config=None) -> Manifest:
    config = config or load_config("debug")
    return Manifest(
        step=step, tokens_seen=step * 256, data_cursor={"epoch": 0, "position": 8 * step, "seed": 0},
        routing_bias_RE=[[0.001 * (e - r) for e in range(8)] for r in range(4)], config_yaml=to_yaml(config),
        layout=Layout.of(config),
        shards=shards if shards is not None else [ShardEntry(rank=0, pp_rank=0, dp_rank=0, file="rank-00000.pt",
                                                             bytes=1, sha256="0" * 64)],
        created_unix=1.0,
    )


def _save(store: CheckpointStore, step: int) -> None:
    staging = store.begin(step)
    (staging / "rank-00000.pt").write_bytes(b"x")
    store.commit(staging, _manifest(step))


# -- files -------------------------------------------------------------------------------------------------------
def test_a_failed_atomic_write_leaves_the_old_file_and_no_litter(tmp_path):
    target = tmp_path / "f.txt"
    write_text_atomic(target, "old")

    def crash(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, crash)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


# -- store -------------------------------------------------------------------------------------------------------
def test_store_commits_whole_checkpoints_and_keeps_the_last_n(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    assert store.latest() is None
    for step in (2, 4, 6):
        _save(store, step)
    assert [s for s, _ in store.complete()] == [4, 6]
    assert store.latest().name == "step-00000006"
    assert Manifest.read(store.latest()).step == 6


def test_a_save_killed_half_way_is_invisible_and_the_previous_checkpoint_loads(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, 2)
    staging = store.begin(4)  # shards written, then the process died before the manifest
    (staging / "rank-00000.pt").write_bytes(b"partial")
    assert store.latest().name == "step-00000002" and resolve_checkpoint(tmp_path).name == "step-00000002"
    _save(store, 6)  # the next commit sweeps the dead staging directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000006"]


def test_commit_refuses_a_checkpoint_with_a_missing_shard(tmp_path):
    store = CheckpointStore(tmp_path)
    staging = store.begin(1)
    with pytest.raises(RuntimeError, match="shard rank-00000.pt was not written"):
        store.commit(staging, _manifest(1))
    assert store.latest() is None


def test_saving_the_same_step_again_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 3)
    _save(store, 3)
    assert [s for s, _ in store.complete()] == [3] and sorted(os.listdir(tmp_path)) == ["step-00000003"]


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.set_aside() is None  # nothing there
    _save(store, 300)
    assert store.set_aside() == tmp_path / "checkpoints.earlier-1"
    assert store.latest() is None and (tmp_path / "checkpoints.earlier-1" / "step-00000300").is_dir()
    _save(store, 100)
    assert store.set_aside() == tmp_path / "checkpoints.earlier-2"


def test_resolve_checkpoint_accepts_run_dir_store_or_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    _save(store, 5)
    expected = tmp_path / "run" / "checkpoints" / "step-00000005"
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", expected):
        assert resolve_checkpoint(path) == expected
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointStore(tmp_path, keep=0)


# -- manifest ----------------------------------------------------------------------------------------------------
def test_manifest_round_trips_through_json(tmp_path):
    manifest = _manifest(7)
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    assert Manifest.read(tmp_path) == manifest


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("step"), "missing field 'step'"),
        (lambda d: d.update(step="7"), "field 'step' must be int, got '7'"),
        (lambda d: d.update(step=True), "field 'step' must be int"),
        (lambda d: d.update(step=-1), r"step \(-1\) and tokens_seen .* must be >= 0"),
        (lambda d: d.update(format="safetensors"), "not a raymoe checkpoint manifest"),
        (lambda d: d.update(version=99), "manifest version 99"),
        (lambda d: d["shards"][0].update(file="../../etc/passwd"), "must be a plain file name"),
        (lambda d: d["shards"][0].update(rank=3), r"shard ranks \[3\] do not cover the 1 workers"),
        (lambda d: d["shards"][0].pop("sha256"), "malformed layout or shard entry"),
        (lambda d: d["layout"].update(pp="2"), "field 'layout.pp' must be int"),
        (lambda d: d.update(routing_bias_RE=[["a"]]), "routing_bias_RE must be a list of lists of numbers"),
    ],
)
def test_malformed_manifests_are_refused_with_the_field_named(mutate, message):
    data = json.loads(_manifest(7).to_json())
    mutate(data)
    with pytest.raises(ValueError, match=message):
        Manifest.from_dict(data, source="m.json")


def test_truncated_manifest_names_the_file(tmp_path):
    (tmp_path / "manifest.json").write_text(_manifest(7).to_json()[:50])
    with pytest.raises(ValueError, match=r"manifest.json' is not valid JSON \(truncated or corrupt\?\)"):
        Manifest.read(tmp_path)


def _mutations(value, rng: random.Random):
    """Random replacements for one JSON value: wrong types, empty containers, negative numbers, deep garbage."""
    choices = [None, True, -1, 0, 2**40, 1.5, "", "x", [], {}, [1, "a"], {"a": None}]
    if isinstance(value, (list, dict)) and value:
        choices.append(value[:1] if isinstance(value, list) else dict(list(value.items())[:1]))
    return rng.choice(choices)


def test_manifest_loader_fuzz_only_ever_raises_value_error():
    """Property: any mutation of a valid manifest either loads or raises ValueError (never KeyError, TypeError...)."""
    rng = random.Random(0)
    base = json.loads(_manifest(7).to_json())
    paths = [(k,) for k in base] + [("layout", k) for k in base["layout"]] + [("shards", 0, k) for k in
                                                                                base["shards"][0]]
    for _ in range(400):
        data = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            *parents, leaf = rng.choice(paths)
            node = data
            try:
                for p in parents:
                    node = node[p]
                node[leaf] = _mutations(node[leaf], rng)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier mutation replaced the parent
        try:
            Manifest.from_dict(data)
        except ValueError:
            pass


# -- shards ------------------------------------------------------------------------------------------------------
def test_shard_round_trip_and_checksum(tmp_path):
    model = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    entry = save_shard(tmp_path, 2, model=model, optimizer={"kind": "adamw", "adamw": opt.state_dict()})
    assert entry["file"] == "rank-00002.pt" and entry["bytes"] > 0 and len(entry["sha256"]) == 64
    payload = load_shard(tmp_path / entry["file"], rank=2, sha256=entry["sha256"])
    assert torch.equal(payload["model"]["w"], model["w"]) and torch.is_tensor(payload["rng"]["torch"])
    with pytest.raises(ValueError, match="is not rank 1's shard"):
        load_shard(tmp_path / entry["file"], rank=1)


def test_corrupt_or_truncated_shards_are_named(tmp_path):
    entry = save_shard(tmp_path, 0, model={"w": torch.randn(64, 64)}, optimizer={})
    path = tmp_path / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"rank-00000.pt' is corrupt: sha256"):
        load_shard(path, rank=0, sha256=entry["sha256"])
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match="rank-00000.pt' cannot be read safely"):
        load_shard(path, rank=0)
    with pytest.raises(ValueError, match="rank-00007.pt' is missing"):
        load_shard(tmp_path / "rank-00007.pt", rank=7)


class _Payload:
    def __reduce__(self):  # what a malicious pickle would do on load
        return (os.system, ("echo pwned",))


def test_shards_never_unpickle_arbitrary_objects(tmp_path):
    path = tmp_path / "rank-00000.pt"
    torch.save({"format": 1, "rank": 0, "model": {}, "optimizer": _Payload(), "rng": {}}, path)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_shard(path, rank=0)


def test_copy_parameters_checks_names_and_shapes():
    params = {"w": torch.nn.Parameter(torch.zeros(2, 2))}
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        copy_parameters(params, {"v": torch.ones(2, 2)}, source="s")
    with pytest.raises(ValueError, match=r"w has shape \(3,\), the model's is \(2, 2\)"):
        copy_parameters(params, {"w": torch.ones(3)}, source="s")
    copy_parameters(params, {"w": torch.ones(2, 2)}, source="s")
    assert torch.equal(params["w"].detach(), torch.ones(2, 2))


# -- compatibility -----------------------------------------------------------------------------------------------
def test_resume_refuses_a_different_model_or_layout_and_allows_more_steps():
    saved = load_config("debug")
    manifest = _manifest(4, config=saved)
    assert config_of(manifest) == saved
    check_compatible(saved, config_of(manifest, ["run.steps=50", "optim.lr=1e-4"]))
    with pytest.raises(ValueError, match=r"saved with model.dim=64, this run has model.dim=32"):
        check_compatible(saved, load_config("debug", ["model.dim=32"]))
    other_layout = load_config("debug", ["parallel.pp=2", "schedule.num_microbatches=4"])
    with pytest.raises(ValueError, match=r"parallel.pp=1, this run has parallel.pp=2.*pass --reshard"):
        check_compatible(saved, other_layout)
    check_compatible(saved, other_layout, reshard=True)  # the layout may change when resharding, the data not:
    with pytest.raises(ValueError, match=r"data.batch_size=8, this run has data.batch_size=16"):
        check_compatible(saved, load_config("debug", ["parallel.pp=2", "data.batch_size=16",
                                                      "schedule.num_microbatches=4"]), reshard=True)
    with pytest.raises(ValueError, match="is at step 4; run.steps=4 leaves nothing to train"):
        check_steps(manifest, 4)


# -- run directory on resume -------------------------------------------------------------------------------------
def test_resumed_run_directory_keeps_earlier_steps_and_sets_later_ones_aside(tmp_path):
    config = load_config("debug")
    first = RunDir(tmp_path, config)
    for step in range(5):
        first.log({"step": step, "loss": float(step)})
    first._file.close()  # killed: no close() (no parquet)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # torn last line
    resumed = RunDir(tmp_path, config, resume_step=3)
    resumed.log({"step": 3, "loss": 30.0})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert superseded[:2] == [json.dumps({"step": 3, "loss": 3.0}), json.dumps({"step": 4, "loss": 4.0})]
    assert [r["step"] for r in resumed.records] == [0, 1, 2, 3]


# -- graceful stop -----------------------------------------------------------------------------------------------
def test_sigterm_requests_a_stop_and_handlers_are_restored():
    from raymoe.train.stop import StopRequests

    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


# -- optimizer state: the local twin continues exactly ------------------------------------------------------------
def test_local_adamw_state_round_trip_continues_bitwise(tmp_path):
    from raymoe.zero import LocalAdamW

    cfg = load_config("debug").optim
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))  # noqa: E731
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    opt_a = LocalAdamW(a, cfg, dp_group=None, pp_group=None)
    grads = [[torch.randn_like(p) for p in a.parameters()] for _ in range(4)]

    def step(model, opt, g):
        for p, gp in zip(model.parameters(), g):
            p.grad = gp.clone()
        opt.step(1e-2)

    for g in grads[:2]:
        step(a, opt_a, g)
    entry = save_shard(tmp_path, 0, model=dict(a.named_parameters()), optimizer=opt_a.state_dict())
    payload = load_shard(tmp_path / entry["file"], rank=0, sha256=entry["sha256"])
    opt_b = LocalAdamW(b, cfg, dp_group=None, pp_group=None)
    copy_parameters(dict(b.named_parameters()), payload["model"], source="t")
    opt_b.load_state_dict(payload["optimizer"])
    for g in grads[2:]:
        step(a, opt_a, g)
        step(b, opt_b, g)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="of kind 'deepspeed-zero' cannot be loaded into a 'adamw'"):
        opt_b.load_state_dict({"kind": "deepspeed-zero"})


def test_manifest_layout_describes_itself():
    layout = Layout.of(load_config("debug", ["parallel.pp=2", "schedule.name=dualpipev",
                                             "schedule.num_microbatches=4"]))
    assert layout.describe() == "dualpipev pp=2 ep=1 dp=1 microbatches=4 zero=1"
    assert asdict(layout)["pp"] == 2


# -- command line ------------------------------------------------------------------------------------------------
def _real_checkpoint(root):
    store = CheckpointStore(root)
    staging = store.begin(3)
    entry = save_shard(staging, 0, model={"w": torch.ones(2)}, optimizer={})
    shards = [ShardEntry(rank=0, pp_rank=0, dp_rank=0, **entry)]
    return store.commit(staging, _manifest(3, shards=shards))


def test_checkpoint_inspect_lists_and_verifies(tmp_path):
    from click.testing import CliRunner

    from raymoe.cli import main

    path = _real_checkpoint(tmp_path / "run" / "checkpoints")
    result = CliRunner().invoke(main, ["checkpoint", "inspect", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "step        3 (tokens seen 768)" in result.output and "rank-00000.pt" in result.output
    assert "layout      1f1b pp=1 ep=1 dp=1 microbatches=" in result.output
    shard = path / "rank-00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["checkpoint", "inspect", str(path)])
    assert result.exit_code == 1 and "CORRUPT" in result.output
    assert "1 of 1 shards are missing or damaged" in result.output


def test_train_resume_refuses_bad_requests_before_starting_anything(tmp_path):
    from click.testing import CliRunner

    from raymoe.cli import main

    _real_checkpoint(tmp_path / "run" / "checkpoints")
    cases = [
        (["--resume", str(tmp_path / "nope")], "does not exist"),
        (["--resume", str(tmp_path / "run"), "--preset", "debug"], "drop --preset/--config"),
        (["--resume", str(tmp_path / "run"), "model.dim=32"], "saved with model.dim=64, this run has model.dim=32"),
        (["--resume", str(tmp_path / "run"), "--steps", "3"], "is at step 3; run.steps=3 leaves nothing to train"),
        (["--resume", str(tmp_path / "run"), "--engine", "local", "--steps", "9"],
         "a checkpoint resumes in its own layout and engine"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["train", *args])
        assert result.exit_code != 0 and message in " ".join(result.output.split()), (args, result.output)


def test_checkpoint_storage_the_workers_cannot_see_is_refused_at_start(tmp_path):
    from raymoe.parallel.topology import Topology
    from raymoe.runtime.driver import Driver

    class NodeLocalWorkers:  # rank 1 lives on a node that does not mount the driver's directory
        topology = Topology(pp=2, ep=1, dp=1)

        def execute(self, method, path):
            assert method.__name__ == "sees_file"
            return [os.path.exists(path), False]

    config = load_config("debug", ["parallel.pp=2", "schedule.num_microbatches=4"])
    driver = Driver(config, worker_group=NodeLocalWorkers())
    with pytest.raises(ValueError, match=r"checkpoint_dir '.*ckpt' is not visible to workers \[1\]"):
        driver.check_checkpoint_storage(CheckpointStore(tmp_path / "ckpt"))
    assert os.listdir(tmp_path / "ckpt") == []  # the probe file is gone


# -- export (consolidated model) ---------------------------------------------------------------------------------
def _model_checkpoint(root, *, tamper: str | None = None, drop: str | None = None):
    """Two shards of the debug model: rank 0 has everything but the head, rank 1 the head and a tied embed copy."""
    from raymoe.model import build_model

    config = load_config("debug")
    params = {n: p.detach().clone() for n, p in build_model(config, seed=0).named_parameters()}
    rank0 = {n: t for n, t in params.items() if n != "head.weight" and n != drop}
    rank1 = {"head.weight": params["head.weight"], "embed.weight": params["embed.weight"].clone()}
    if tamper:
        rank1[tamper] = rank1[tamper] + 1e-3
    store = CheckpointStore(root)
    staging = store.begin(5)
    shards = [ShardEntry(rank=r, pp_rank=r, dp_rank=0, **save_shard(staging, r, model=m, optimizer={}))
              for r, m in enumerate((rank0, rank1))]
    manifest = _manifest(5, shards=shards, config=config)
    manifest = Manifest.from_dict({**json.loads(manifest.to_json()),
                                   "layout": {**asdict(manifest.layout), "pp": 2},
                                   "routing_bias_RE": [[0.01 * e for e in range(8)] for _ in range(4)]})
    return store.commit(staging, manifest), params


def test_export_is_the_union_of_shards_and_checks_copies(tmp_path):
    from raymoe.checkpoint.export import BIAS, check_export, export_safetensors, load_export

    path, params = _model_checkpoint(tmp_path / "a")
    out = export_safetensors(path, tmp_path / "model.safetensors", dtype="bf16")
    tensors, metadata = load_export(out)
    assert set(tensors) == set(params) | {BIAS} and metadata["raymoe_step"] == "5"
    assert tensors["head.weight"].dtype == torch.bfloat16 and tensors[BIAS].dtype == torch.float32
    assert torch.equal(tensors["embed.weight"], params["embed.weight"].bfloat16())
    check_export(out, load_config("debug"))
    with pytest.raises(ValueError, match=r"does not fit this model .*missing \['layers.4"):
        check_export(out, load_config("debug", ["model.num_layers=6"]))
    with pytest.raises(ValueError, match=r"embed.weight has shape \(260, 64\), the model's is \(300, 64\)"):
        check_export(out, load_config("debug", ["model.vocab_size=300"]))

    bad, _ = _model_checkpoint(tmp_path / "b", tamper="embed.weight")
    with pytest.raises(ValueError, match="the copies of embed.weight on ranks 0 and 1 differ"):
        export_safetensors(bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    short, _ = _model_checkpoint(tmp_path / "c", drop="norm.weight")
    with pytest.raises(ValueError, match=r"shards do not add up to the model \(missing \['norm.weight'\]"):
        export_safetensors(short, tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors' is not a readable safetensors file"):
        load_export(tmp_path / "junk.safetensors")


def test_the_reference_trainer_starts_from_an_export(tmp_path):
    from raymoe.checkpoint.export import BIAS, export_safetensors
    from raymoe.train import ReferenceTrainer

    path, params = _model_checkpoint(tmp_path / "a")
    out = export_safetensors(path, tmp_path / "model.safetensors")
    trainer = ReferenceTrainer(load_config("debug", [f"run.init_from={out}", "run.seed=123"]))
    assert all(torch.equal(p, params[n]) for n, p in trainer.model.named_parameters())
    assert torch.allclose(trainer.routing_bias_RE[0], torch.arange(8) * 0.01) and BIAS not in params
    with pytest.raises(ValueError, match="model export '.*nope.safetensors' does not exist"):
        ReferenceTrainer(load_config("debug", [f"run.init_from={tmp_path / 'nope.safetensors'}"]))


def test_checkpoint_export_command(tmp_path):
    from click.testing import CliRunner

    from raymoe.cli import main

    _model_checkpoint(tmp_path / "run" / "checkpoints")
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(main, ["checkpoint", "export", str(tmp_path / "run"), "--out", str(out)])
    assert result.exit_code == 0 and "step-00000005 -> " in result.output and out.is_file(), result.output
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "run"), "--init-from", str(out)])
    assert result.exit_code != 0 and "pick one" in result.output


def test_the_single_process_trainer_resumes_bitwise(tmp_path):
    from raymoe.train import train_local

    config = load_config("debug", ["run.steps=6", "run.checkpoint_every=3"])
    straight = train_local(config, out_dir=str(tmp_path / "straight"), progress=False)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-00000003"
    assert Manifest.read(checkpoint).layout.schedule == "local"
    resumed_config = load_config("debug", ["run.steps=6", "run.checkpoint_every=3",
                                           f"run.checkpoint_dir={tmp_path / 'again'}"])
    resumed = train_local(resumed_config, out_dir=str(tmp_path / "straight"), progress=False, resume=checkpoint)
    keys = ("loss", "mtp_loss", "grad_norm", "max_vio")
    assert [r["step"] for r in resumed] == list(range(6))  # steps 0-2 kept from the run directory
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    events = [json.loads(line)["event"] for line in (tmp_path / "straight" / "events.jsonl").read_text().splitlines()]
    assert events == ["checkpoint", "checkpoint", "resumed", "checkpoint"]
