"""The driver: layouts refused before any actor starts, the state machine, bootstrap, and ``raymoe train``."""

from __future__ import annotations

import json

import pytest
import torch

from raymoe.config import load_config
from raymoe.parallel.topology import Topology
from raymoe.runtime.driver import TRANSITIONS, Driver, DriverState
from raymoe.runtime.results import LoadInfo
from raymoe.runtime.worker import Worker
from raymoe.runtime.worker_group import check_resources


def _config(*overrides: str):
    return load_config("debug", list(overrides))


# -- refused early, with the values named (no Ray needed) --------------------------------------------------------
def test_odd_pp_for_dualpipe_is_refused():
    with pytest.raises(ValueError, match="parallel.pp=3: dualpipe needs an even pp .*got pp=3"):
        _config("parallel.pp=3", "schedule.name=dualpipe", "schedule.num_microbatches=6", "data.batch_size=12")


def test_zero_stage_2_with_expert_parallelism_is_refused_when_the_config_loads():
    with pytest.raises(ValueError, match="parallel.zero_stage=2 with parallel.ep=2: ZeRO-2 does not partition"):
        _config("parallel.ep=2", "parallel.dp=2", "parallel.zero_stage=2", "schedule.num_microbatches=2")


def test_zero_stage_2_is_refused_where_pipeline_ranks_share_parameters():
    """ZeRO-2 frees each backward pass's gradients; copies summed across pipeline ranks after the last backward
    (DualPipe's mirror, the MTP embedding) would come too late. The rule lives in
    ``raymoe.schedule.layout_rules``: the config refuses it as it loads (the driver applies it again for configs
    built in code)."""
    with pytest.raises(ValueError, match="parallel.zero_stage=2 with schedule.name=dualpipe, parallel.pp=2: DualPipe "
                                         "keeps two copies .* use schedule.name=dualpipev"):
        Driver(_config("parallel.zero_stage=2", "parallel.pp=2", "parallel.dp=2", "schedule.name=dualpipe",
                       "schedule.num_microbatches=4"))
    for schedule in ("1f1b", "gpipe", "zb1p"):
        with pytest.raises(ValueError, match=f"parallel.zero_stage=2 with schedule.name={schedule}, parallel.pp=2, "
                                             f"mtp.depth=1: the MTP modules .* parallel.pp=1, mtp.depth=0"):
            Driver(_config("parallel.zero_stage=2", "parallel.pp=2", "parallel.dp=2", f"schedule.name={schedule}",
                           "schedule.num_microbatches=4"))


@pytest.mark.parametrize(
    "overrides",
    [
        ("parallel.pp=1", "schedule.name=1f1b", "schedule.num_microbatches=2"),
        ("parallel.pp=1", "schedule.name=zb1p", "schedule.num_microbatches=2"),
        ("parallel.pp=2", "schedule.name=dualpipev", "schedule.num_microbatches=4"),
        ("parallel.pp=2", "schedule.name=1f1b", "schedule.num_microbatches=4", "mtp.depth=0"),
    ],
)
def test_zero_stage_2_is_accepted_where_no_parameter_is_shared(overrides):
    Driver(_config("parallel.zero_stage=2", "parallel.dp=2", *overrides))  # validated; no actor starts


def test_experts_not_divisible_by_ep_are_refused():
    with pytest.raises(ValueError, match=r"num_routed_experts \(8\) must be divisible by parallel.ep \(3\)"):
        _config("parallel.ep=3", "parallel.dp=3", "data.batch_size=9", "schedule.num_microbatches=1")


def test_more_workers_than_cpus_or_gpus_is_refused():
    with pytest.raises(ValueError, match=r"pp=4 x dp=4 = 16 workers need 16 CPUs .* has 8"):
        check_resources(Topology(pp=4, dp=4), device="cpu", num_cpus_per_worker=1, cluster={"CPU": 8.0})
    with pytest.raises(ValueError, match="need 2 GPUs but the Ray cluster has 1"):
        check_resources(Topology(pp=2), device="cuda", num_cpus_per_worker=1, cluster={"CPU": 8.0, "GPU": 1.0})
    check_resources(Topology(pp=2, dp=4), device="cpu", num_cpus_per_worker=1, cluster={"CPU": 8.0})


# -- state machine with a fake worker group ------------------------------------------------------------------------
class FakeGroup:
    """Answers like a WorkerGroup; ``run_step`` fails the way a dead actor makes ray.get fail."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.calls: list[str] = []

    def execute_each(self, method, args_per_rank, timeout_s=None):
        method = method.__name__
        self.calls.append(method)
        if method == "run_step" and timeout_s is not None:
            raise TimeoutError(f"1 of 2 workers did not answer within {timeout_s} s")
        if method == "run_step":
            raise RuntimeError("worker raymoe/pp1-ep0-dp0 died")
        return [LoadInfo(rank=r, chunks=(0,), layers=(0,), num_params=1, param_bytes=4, optimizer="LocalAdamW")
                for r in range(len(args_per_rank))]

    def execute(self, method, *args, timeout_s=None):
        self.calls.append(method.__name__)
        return []


class Retry:
    def decide(self, error, state):
        return DriverState.RECOVERING


def test_transitions_table_is_closed():
    assert TRANSITIONS[DriverState.FINISHED] == TRANSITIONS[DriverState.ERRORED] == frozenset()
    assert DriverState.RUNNING in TRANSITIONS[DriverState.CHECKPOINTING]
    assert DriverState.RUNNING in TRANSITIONS[DriverState.RECOVERING]


@pytest.mark.ray
def test_a_failing_step_moves_the_driver_to_errored(ray_session):
    config = _config("parallel.pp=2")
    group = FakeGroup(Topology(pp=2))
    driver = Driver(config, worker_group=group)
    with pytest.raises(RuntimeError, match="start"):
        driver.step()
    driver.start()
    assert driver.state is DriverState.RUNNING
    with pytest.raises(RuntimeError, match="died"):
        driver.step(torch.zeros(8, 34, dtype=torch.long))
    assert [t.state for t in driver.history] == [DriverState.INITIALIZING, DriverState.RUNNING, DriverState.ERRORED]
    assert "died" in driver.history[-1].reason
    assert group.calls == ["load", "run_step", "unload"]  # not its group to stop: it only unloads its layout

    retrying = Driver(config, worker_group=FakeGroup(Topology(pp=2)), failure_policy=Retry()).start()
    with pytest.raises(RuntimeError):
        retrying.step(torch.zeros(8, 34, dtype=torch.long))
    assert retrying.state is DriverState.RECOVERING


# -- with real workers ---------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_too_large_layout_fails_before_any_actor_starts(ray_session):
    from ray.util import list_named_actors

    before = set(list_named_actors())
    driver = Driver(_config("parallel.pp=4", "parallel.dp=4", "data.batch_size=16", "schedule.num_microbatches=4"))
    with pytest.raises(ValueError, match="16 workers need 16 CPUs"):
        driver.start()
    assert driver.state is DriverState.ERRORED
    assert set(list_named_actors()) == before


@pytest.mark.ray
def test_bootstrap_ranks_names_and_groups(worker_groups):
    import ray

    group = worker_groups.get(Topology(pp=2, dp=1))
    info = group.execute(Worker.whoami)
    assert [i["dist_rank"] for i in info] == [0, 1] and {i["world_size"] for i in info} == {2}
    assert {i["backend"] for i in info} == {"gloo"}
    assert info[0]["groups"] == {"pp": (0, 1), "embedding": (0, 1), "mirror": (0, 1)}
    assert len({i["pid"] for i in info}) == 2
    assert ray.get(ray.get_actor("raymoe/pp1-ep0-dp0").whoami.remote())["rank"] == 1


@pytest.mark.ray
def test_train_command_runs_dualpipev_through_ray(worker_groups, tmp_path):
    from click.testing import CliRunner

    from raymoe.cli import main
    from raymoe.train.metrics import StepMetrics

    worker_groups.close()  # ``train`` starts its own workers, with the same actor names
    out = tmp_path / "run"
    args = ["train", "--preset", "debug", "--steps", "3", "--out", str(out), "parallel.pp=2",
            "schedule.name=dualpipev", "schedule.num_microbatches=4"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "done: 3 steps" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    fields = set(StepMetrics.__dataclass_fields__) - {"extra"}
    assert fields <= set(records[0]) and records[0]["engine"] == "ray"
    assert records[-1]["loss"] < records[0]["loss"]
    assert all((out / name).exists() for name in ("config.yaml", "metrics.parquet", "loss.png"))


def test_restart_policy_retries_worker_failures_only_up_to_its_budget():
    from raymoe.runtime.driver import RestartFromCheckpoint

    policy = RestartFromCheckpoint(max_failures=2)
    died = RuntimeError("worker raymoe/pp1-ep0-dp0 died")
    assert policy.decide(ValueError("bad shard"), DriverState.RUNNING) is DriverState.ERRORED  # never retried
    assert policy.decide(KeyboardInterrupt(), DriverState.RUNNING) is DriverState.ERRORED
    assert policy.decide(died, DriverState.RECOVERING) is DriverState.ERRORED  # a recovery that failed
    assert policy.decide(died, DriverState.RUNNING) is DriverState.RECOVERING
    assert policy.decide(died, DriverState.CHECKPOINTING) is DriverState.RECOVERING
    assert policy.decide(died, DriverState.RUNNING) is DriverState.ERRORED and policy.failures == 2


@pytest.mark.ray
def test_a_hung_step_times_out_into_recovery(ray_session):
    from raymoe.runtime.driver import RestartFromCheckpoint

    config = _config("parallel.pp=2", "run.step_timeout_s=2.5", "run.max_failures=1")
    driver = Driver(config, worker_group=FakeGroup(Topology(pp=2)), failure_policy=RestartFromCheckpoint(1)).start()
    with pytest.raises(TimeoutError, match="did not answer within 2.5 s"):
        driver.step(torch.zeros(8, 34, dtype=torch.long))
    assert driver.state is DriverState.RECOVERING
