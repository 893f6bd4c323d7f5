"""``--reshard``: a checkpoint of one layout continues in another with its weights and exact AdamW state.

Layout A (DualPipeV pp=2 dp=2, DeepSpeed ZeRO-1: flat optimizer partitions, mirrored stages, the tied embedding)
saves at step 2 and continues 2 steps. Other layouts restored from that checkpoint run the same 2 steps (same
batches: the data cursor; same learning rates: the step index; same routing: the biases). The sums run in another
order, so the losses agree to fp32 rounding (measured <= 5e-8 relative), not bitwise. A fresh optimizer instead
of the moved state would be off by ~1e-2 (checked: the AdamW state really moved).
"""

from __future__ import annotations

import pytest
import torch

from raymoe.checkpoint import CheckpointStore
from raymoe.config import load_config
from raymoe.parallel.topology import Topology
from raymoe.runtime.worker import Worker

pytestmark = pytest.mark.ray

LAYOUT_A = ("parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1", "schedule.name=dualpipev",
            "schedule.num_microbatches=4")
RTOL = 1e-5


def _config(*overrides: str):
    return load_config("debug", ["run.steps=4", *overrides])


def _parameters(driver) -> dict[str, torch.Tensor]:
    merged = {}
    for part in driver.worker_group.execute(Worker.parameters, driver.key):
        merged.update(part)
    return merged


@pytest.fixture(scope="module")
def saved_in_a(worker_groups, tmp_path_factory):
    """(checkpoint at step 2, the records of steps 2-3 in layout A, the parameters after step 3)."""
    from raymoe.runtime.driver import Driver

    config = _config(*LAYOUT_A)
    driver = Driver(config, worker_group=worker_groups.get(Topology(pp=2, dp=2))).start()
    driver.run(2)
    path = driver.save_checkpoint(CheckpointStore(tmp_path_factory.mktemp("a") / "checkpoints"))
    continued = driver.run(2)
    params = _parameters(driver)
    driver.finish()
    return path, continued, params


def _compare(records, params, saved_in_a) -> None:
    _, continued, params_a = saved_in_a
    assert [r["step"] for r in records] == [2, 3]
    rel = max(abs(new[k] - old[k]) / abs(old[k]) for new, old in zip(records, continued)
              for k in ("loss", "mtp_loss", "grad_norm"))
    worst = max(float((params[n] - p).abs().max()) for n, p in params_a.items())
    print(f"max relative difference of losses and grad norms {rel:.1e}, max |parameter difference| {worst:.1e}")
    assert rel <= RTOL, records
    assert worst < 1e-5, worst


def _ray_resharded(worker_groups, saved_in_a, *overrides: str):
    from raymoe.runtime.driver import Driver

    path = saved_in_a[0]
    config = _config(*overrides)
    group = worker_groups.get(Topology(pp=config.parallel.pp, dp=config.parallel.dp))
    driver = Driver(config, worker_group=group).start()
    manifest = driver.restore(path, reshard=True)
    assert (driver.step_index, driver.tokens_seen) == (2, manifest.tokens_seen)
    records = driver.run(2)
    params = _parameters(driver)
    driver.finish()
    return records, params


def test_zero1_dualpipev_dp2_continues_on_the_single_process_trainer(saved_in_a):
    from raymoe.train import ReferenceTrainer

    path = saved_in_a[0]
    trainer = ReferenceTrainer(_config())
    trainer.restore(path, reshard=True)
    records = [trainer.step() for _ in range(2)]
    _compare(records, {n: p.detach() for n, p in trainer.model.named_parameters()}, saved_in_a)

    fresh = ReferenceTrainer(_config())  # the same weights without the moved AdamW state: visibly another run
    fresh.restore(path, reshard=True)
    fresh.optimizer.state.clear()
    fresh.step()
    second = fresh.step()
    assert abs(second["loss"] - saved_in_a[1][1]["loss"]) > 100 * RTOL * saved_in_a[1][1]["loss"]


@pytest.mark.slow
def test_zero1_dualpipev_dp2_continues_in_1f1b_pp2_dp1(worker_groups, saved_in_a):
    records, params = _ray_resharded(worker_groups, saved_in_a, "parallel.pp=2", "schedule.name=1f1b",
                                     "schedule.num_microbatches=4")
    _compare(records, params, saved_in_a)


@pytest.mark.slow
def test_zero1_dualpipev_dp2_continues_in_zero2_dp2(worker_groups, saved_in_a):
    records, params = _ray_resharded(worker_groups, saved_in_a, "parallel.dp=2", "parallel.zero_stage=2",
                                     "schedule.num_microbatches=2")
    _compare(records, params, saved_in_a)


def test_reshard_refuses_another_batch_size_and_names_the_field(saved_in_a):
    from raymoe.runtime.launch import train_ray

    config = _config("parallel.pp=2", "schedule.name=1f1b", "schedule.num_microbatches=4", "data.batch_size=16")
    with pytest.raises(ValueError, match=r"saved with data.batch_size=8, this run has data.batch_size=16"):
        train_ray(config, resume=saved_in_a[0], reshard=True, progress=False)
    with pytest.raises(ValueError, match=r"saved by the layout dualpipev pp=2 .*--reshard continues it in another"):
        train_ray(_config("parallel.pp=2", "schedule.name=1f1b", "schedule.num_microbatches=4"),
                  resume=saved_in_a[0], progress=False)
