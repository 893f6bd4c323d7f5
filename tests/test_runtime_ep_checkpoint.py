"""Checkpoints under expert parallelism: shards name experts by global id, resume is bitwise in the same layout,
``--reshard`` moves an ep=2 run to ep=1 (with a pipeline change) and to ep=4 with its AdamW state, an expert
shard never loads into another rank's experts, and the export is one model whatever ep was.

Layout A: pp=1, ep=2, dp=2 (1f1b), DeepSpeed ZeRO-1 over dense parameters and plain AdamW over each expert shard
(edp = 1). It saves at step 2 and continues 2 steps; the other layouts restored from that checkpoint run the same
2 steps and must agree within the parity tolerance (the sums run in another order: not bitwise).
"""

from __future__ import annotations

import pytest
import torch

from raymoe.checkpoint import CheckpointStore, Manifest
from raymoe.config import load_config
from raymoe.parallel.topology import Topology

pytestmark = pytest.mark.ray

LAYOUT_A = ("parallel.pp=1", "parallel.ep=2", "parallel.dp=2", "schedule.name=1f1b", "schedule.num_microbatches=2")
RTOL = 1e-5


def _config(*overrides: str):
    return load_config("debug", ["run.steps=4", *overrides])


def _group(worker_groups, config):
    p = config.parallel
    return worker_groups.get(Topology(pp=p.pp, ep=p.ep, dp=p.dp))


def _parameters(driver) -> dict[str, torch.Tensor]:
    merged = {}
    for part in driver.worker_group.execute("parameters", driver.key):
        merged.update(part)
    return merged


@pytest.fixture(scope="module")
def saved_in_a(worker_groups, tmp_path_factory):
    from raymoe.runtime.driver import Driver

    config = _config(*LAYOUT_A)
    driver = Driver(config, worker_group=_group(worker_groups, config)).start()
    driver.run(2)
    path = driver.save_checkpoint(CheckpointStore(tmp_path_factory.mktemp("ep") / "checkpoints"))
    continued = driver.run(2)
    params = _parameters(driver)
    driver.finish()
    return path, continued, params


def _restored(worker_groups, path, *overrides: str, reshard: bool):
    from raymoe.runtime.driver import Driver

    config = _config(*overrides)
    driver = Driver(config, worker_group=_group(worker_groups, config)).start()
    driver.restore(path, reshard=reshard)
    records = driver.run(2)
    params = _parameters(driver)
    driver.finish()
    return records, params


def test_shards_name_experts_by_global_id(saved_in_a):
    manifest = Manifest.read(saved_in_a[0])
    assert manifest.expert_placement == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [s.expert_ids for s in sorted(manifest.shards, key=lambda s: s.rank)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shard = torch.load(saved_in_a[0] / manifest.shards[1].file, weights_only=True)
    assert "layers.1.ffn.experts.4.w1.weight" in shard["model"]
    assert not any(".experts.0." in name for name in shard["model"])


def test_resume_in_the_same_layout_is_bitwise(worker_groups, saved_in_a):
    path, continued, params = saved_in_a
    records, resumed_params = _restored(worker_groups, path, *LAYOUT_A, reshard=False)
    keys = ("loss", "mtp_loss", "grad_norm", "max_vio")
    assert [[r[k] for k in keys] for r in records] == [[r[k] for k in keys] for r in continued]
    assert all(torch.equal(resumed_params[n], p) for n, p in params.items())


@pytest.mark.parametrize("overrides", [
    ("parallel.pp=2", "parallel.ep=1", "parallel.dp=2", "schedule.name=1f1b", "schedule.num_microbatches=2"),
    ("parallel.pp=1", "parallel.ep=4", "parallel.dp=4", "schedule.name=1f1b", "schedule.num_microbatches=1"),
], ids=["ep1-pp2", "ep4"])
def test_reshard_ep2_continues_in_another_expert_layout(worker_groups, saved_in_a, overrides):
    path, continued, params_a = saved_in_a
    records, params = _restored(worker_groups, path, *overrides, reshard=True)
    assert [r["step"] for r in records] == [2, 3]
    rel = max(abs(new[k] - old[k]) / abs(old[k]) for new, old in zip(records, continued)
              for k in ("loss", "mtp_loss", "grad_norm"))
    worst = max(float((params[n] - p).abs().max()) for n, p in params_a.items())
    print(f"{overrides}: max relative difference {rel:.1e}, max |parameter difference| {worst:.1e}")
    assert rel <= RTOL and worst < 1e-5, (rel, worst)


def test_an_expert_shard_never_loads_into_other_experts(saved_in_a):
    from raymoe.checkpoint import copy_parameters
    from raymoe.parallel.stage_plan import build_stage, plan_stages

    path = saved_in_a[0]
    manifest = Manifest.read(path)
    config = _config(*LAYOUT_A)
    plan = plan_stages(config.model.num_layers, 1)
    rank1_stage = build_stage(config, plan, [0], expert_ids=[4, 5, 6, 7])
    rank0_shard = torch.load(path / manifest.shards[0].file, weights_only=True)["model"]
    with pytest.raises(ValueError, match=r"experts\.[0-7]"):
        copy_parameters(dict(rank1_stage.named_parameters()), rank0_shard, source="rank 0's shard")


def test_export_is_one_model_whatever_ep_was(saved_in_a, tmp_path):
    from raymoe.checkpoint.export import export_safetensors, load_export
    from raymoe.model import build_model

    tensors, _ = load_export(export_safetensors(saved_in_a[0], tmp_path / "model.safetensors"))
    full = dict(build_model(_config()).named_parameters())
    assert set(full) <= set(tensors)
    assert all(f"layers.1.ffn.experts.{e}.w2.weight" in tensors for e in range(8))
