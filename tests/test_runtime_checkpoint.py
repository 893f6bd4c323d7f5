"""Checkpoints through the Ray runtime: a run stopped and resumed is bitwise the run that never stopped.

The same worker group serves both runs: each ``Driver`` loads a fresh layout on it (the model rebuilt from the
seed), so the resumed run starts from nothing but the checkpoint.
"""

from __future__ import annotations

import re

import pytest
import torch

from raymoe.checkpoint import CheckpointStore, Manifest
from raymoe.config import load_config
from raymoe.parallel.topology import Topology

pytestmark = pytest.mark.ray


def _config(*overrides: str):
    return load_config("debug", ["run.steps=4", *overrides])


def _losses(records):
    return [(r["loss"], r["mtp_loss"], r["grad_norm"], r["max_vio"]) for r in records]


def _straight_then_resumed(worker_groups, config, tmp_path, *, split: int):
    from raymoe.runtime.driver import Driver

    group = worker_groups.get(Topology(pp=config.parallel.pp, dp=config.parallel.dp))
    store = CheckpointStore(tmp_path / "checkpoints")
    driver = Driver(config, worker_group=group).start()
    straight = []
    for _ in range(config.run.steps):
        straight.append(driver.step().record)
        if driver.step_index == split:
            path = driver.save_checkpoint(store)
    driver.finish()

    resumed_driver = Driver(config, worker_group=group).start()
    manifest = resumed_driver.restore(path)
    resumed = [resumed_driver.step().record for _ in range(config.run.steps - split)]
    resumed_driver.finish()
    return straight, resumed, manifest, path


def test_resume_is_bitwise_the_uninterrupted_run_pp2(worker_groups, tmp_path):
    config = _config("parallel.pp=2", "schedule.name=dualpipev", "schedule.num_microbatches=4")
    straight, resumed, manifest, path = _straight_then_resumed(worker_groups, config, tmp_path, split=2)
    assert _losses(resumed) == _losses(straight[2:])
    assert [r["step"] for r in resumed] == [2, 3]
    assert manifest.step == 2 and manifest.tokens_seen == 2 * 8 * 32
    assert manifest.data_cursor == {"epoch": 0, "position": 16, "seed": 0}
    assert any(v != 0 for row in manifest.routing_bias_RE for v in row)  # the biases moved and were saved
    assert sorted(f.name for f in path.iterdir()) == ["manifest.json", "rank-00000.pt", "rank-00001.pt",
                                                      "tokenizer_info.json"]  # the data's tokenizer (byte)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_resume_restores_deepspeed_zero_partitions_bitwise(worker_groups, tmp_path, zero_stage):
    config = _config("parallel.dp=2", "schedule.num_microbatches=2", f"parallel.zero_stage={zero_stage}")
    straight, resumed, manifest, _ = _straight_then_resumed(worker_groups, config, tmp_path, split=2)
    assert _losses(resumed) == _losses(straight[2:])
    assert [(s.rank, s.dp_rank) for s in manifest.shards] == [(0, 0), (1, 1)]


def test_restore_names_a_corrupt_shard_and_a_foreign_layout(worker_groups, tmp_path):
    from raymoe.runtime.driver import Driver, DriverState

    config = _config("parallel.pp=2", "schedule.name=1f1b", "schedule.num_microbatches=4")
    group = worker_groups.get(Topology(pp=2, dp=1))
    driver = Driver(config, worker_group=group).start()
    driver.step()
    path = driver.save_checkpoint(CheckpointStore(tmp_path))
    driver.finish()

    other = _config("parallel.pp=2", "schedule.name=gpipe", "schedule.num_microbatches=4")
    with pytest.raises(ValueError, match="saved by the layout 1f1b pp=2 .*; this run is gpipe pp=2"):
        Driver(other, worker_group=group).start().restore(path)

    shard = path / Manifest.read(path).shards[1].file
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh = Driver(config, worker_group=group).start()
    with pytest.raises(ValueError, match=r"rank-00001.pt' is corrupt: sha256"):
        fresh.restore(path)
    assert fresh.state is DriverState.ERRORED


def _kill_worker_when(metrics_path, steps_logged: int, name: str, done: list) -> None:
    """Fault injection from outside, as a node loss would do it: kill a worker actor mid-run."""
    import time

    import ray

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics_path.is_file() and len(metrics_path.read_text().splitlines()) >= steps_logged:
            ray.kill(ray.get_actor(name), no_restart=True)
            done.append(time.monotonic())
            return
        time.sleep(0.02)


def test_a_killed_worker_is_replaced_and_the_run_ends_as_if_nothing_happened(worker_groups, tmp_path):
    import json
    import threading

    from raymoe.runtime.launch import train_ray

    worker_groups.close()  # train_ray starts its own workers, with the same actor names
    config = load_config("debug", ["run.steps=24", "run.checkpoint_every=4", "run.max_failures=1", "parallel.pp=2",
                                   "schedule.name=1f1b", "schedule.num_microbatches=4"])
    calm = train_ray(config, out_dir=str(tmp_path / "calm"), progress=False)

    out = tmp_path / "faulty"
    killed: list = []
    killer = threading.Thread(target=_kill_worker_when,
                              args=(out / "metrics.jsonl", 10, "raymoe/pp1-ep0-dp0", killed))
    killer.start()
    records = train_ray(config, out_dir=str(out), progress=False)
    killer.join()
    assert killed, "the fault was never injected"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    recovered = [e for e in events if e["event"] == "recovered"]
    assert len(recovered) == 1 and recovered[0]["resumed_at_step"] % 4 == 0
    assert recovered[0]["resumed_at_step"] <= recovered[0]["failed_at_step"]
    assert [r["step"] for r in records] == list(range(24))
    assert _losses(records) == _losses(calm)  # bitwise: the redone steps are the steps of the calm run
    assert (out / "metrics.superseded.jsonl").is_file() or recovered[0]["resumed_at_step"] == \
        recovered[0]["failed_at_step"]
    from raymoe.report import write_report

    text = write_report(out).summary_path.read_text()  # the report lists the checkpoints and the recovery
    assert "## Checkpoints and events" in text and "| recovered |" in text and "new workers from" in text


def test_export_consolidates_shards_and_another_layout_starts_from_it(worker_groups, tmp_path):
    """DualPipe pp=2 (mirrored stages, tied embedding) -> one safetensors file -> the single-process trainer with
    ``run.init_from``: on the same next batch it computes the same loss as the run it came from."""
    from raymoe.checkpoint.export import BIAS, export_safetensors, load_export
    from raymoe.runtime.driver import Driver
    from raymoe.train import ReferenceTrainer

    config = _config("parallel.pp=2", "schedule.name=dualpipe", "schedule.num_microbatches=4")
    driver = Driver(config, worker_group=worker_groups.get(Topology(pp=2, dp=1))).start()
    for _ in range(2):
        driver.step()
    path = driver.save_checkpoint(CheckpointStore(tmp_path / "checkpoints"))
    next_batch = driver.batches.next_batch()
    continued = driver.step(next_batch).record
    driver.finish()

    out = export_safetensors(path, tmp_path / "model.safetensors")
    tensors, metadata = load_export(out)
    assert metadata["raymoe_step"] == "2" and "dim: 64" in metadata["raymoe_config"]
    assert tensors[BIAS].tolist() == Manifest.read(path).routing_bias_RE

    other = load_config("debug", ["run.steps=4", f"run.init_from={out}"])  # pp=1: another layout
    trainer = ReferenceTrainer(other)
    assert torch.equal(trainer.routing_bias_RE, tensors[BIAS])
    trainer.step_index = 2  # the same learning rate; the weights and biases are what the export carries
    record = trainer.step(next_batch)
    assert abs(record["loss"] - continued["loss"]) <= 1e-6 * continued["loss"], (record["loss"], continued["loss"])
    assert abs(record["mtp_loss"] - continued["mtp_loss"]) <= 1e-6 * continued["mtp_loss"]

    # ... and so does a Ray layout of another schedule, whose two workers each read only their stage's tensors.
    gpipe = load_config("debug", ["run.steps=4", f"run.init_from={out}", "parallel.pp=2", "schedule.name=gpipe",
                                  "schedule.num_microbatches=4"])
    ray_driver = Driver(gpipe, worker_group=worker_groups.get(Topology(pp=2, dp=1))).start()
    ray_driver.step_index = 2
    ray_record = ray_driver.step(next_batch).record
    ray_driver.finish()
    assert abs(ray_record["loss"] - continued["loss"]) <= 1e-6 * continued["loss"]


def test_a_diverging_ray_run_keeps_its_last_good_checkpoint(worker_groups, tmp_path):
    from raymoe.runtime.launch import train_ray
    from raymoe.train.metrics import NonFiniteLoss

    worker_groups.close()
    config = load_config("debug", ["run.steps=10", "run.checkpoint_every=1", "run.keep_checkpoints=2",
                                   "optim.lr=1e4", "optim.grad_clip=0", "parallel.pp=2", "schedule.name=1f1b",
                                   "schedule.num_microbatches=4", f"run.out_dir={tmp_path}"])
    pattern = r"step (\d+): grad_norm=nan .*last good checkpoint is .*step-0*(\d+)"
    with pytest.raises(NonFiniteLoss, match=pattern) as err:
        train_ray(config, progress=False)
    bad = int(re.search(r"step (\d+): grad_norm", str(err.value)).group(1))
    assert f"step-{bad:08d}" in str(err.value)  # the checkpoint of the steps before the bad one
    store = CheckpointStore(tmp_path / "checkpoints")
    assert [s for s, _ in store.complete()] == [bad - 1, bad]  # nothing poisoned was saved, nothing good was pruned
