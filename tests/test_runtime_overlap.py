"""``schedule.overlap_a2a``: DualPipe's F&B pairs run their forward and backward chunks in turns, each chunk's
expert all-to-alls in flight while the other computes, in an order every rank of an ep group shares. Losses,
gradient norms, MaxVio and the weights after the steps must be bitwise those of the sequential run, on the same
workers and batches (the F&B pairs of dualpipe and dualpipev at pp=2 x ep=2; 1f1b has no pairs and must be
untouched)."""

from __future__ import annotations

import pytest
import torch

from raymoe.config import load_config
from raymoe.parallel.topology import Topology
from raymoe.runtime.worker import Worker

pytestmark = pytest.mark.ray

KEYS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "max_vio")


def _run(worker_groups, schedule: str, overlap: bool, batches):
    from raymoe.runtime.driver import Driver

    config = load_config("debug", ["parallel.pp=2", "parallel.ep=2", "parallel.dp=2", f"schedule.name={schedule}",
                                   "schedule.num_microbatches=4", f"schedule.overlap_a2a={str(overlap).lower()}",
                                   "run.steps=3"])
    driver = Driver(config, worker_group=worker_groups.get(Topology(pp=2, ep=2, dp=2))).start()
    try:
        reports = [driver.step(batch) for batch in batches]
        records = [r.record for r in reports]
        _check_turns(reports, overlap and schedule != "1f1b")  # 1F1B has no F&B pairs
        params = {}
        for part in driver.worker_group.execute(Worker.parameters, driver.key):
            params.update(part)
        counts = [r["expert_load"] for r in records]
    finally:
        driver.finish()
    return records, params, counts


def _check_turns(reports, turns_expected: bool) -> None:
    """With overlap the pairs ran in turns, and the ranks of each ep group issued their exchanges in one and the
    same order (forward / backward interleaving included): the order is the action lists', not a race's."""
    for report in reports:
        turns = sum(len(r.phases) for r in report.results)
        assert (turns > 0) == turns_expected
        for pp_rank in {r.pp_rank for r in report.results}:
            orders = {tuple(e.part for e in sorted(r.exchanges, key=lambda e: e.issued_s))
                      for r in report.results if r.pp_rank == pp_rank}
            assert len(orders) == 1, f"ep peers at pp rank {pp_rank} issued their exchanges in different orders"
        if turns_expected:
            record = report.record
            assert 0 < record["a2a_exposed_seconds_max"] <= record["a2a_seconds_max"]


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 260, (8, 34), generator=generator) for _ in range(3)]


def _same(worker_groups, schedule: str) -> None:
    batches = _batches()
    off, params_off, counts_off = _run(worker_groups, schedule, False, batches)
    on, params_on, counts_on = _run(worker_groups, schedule, True, batches)
    assert [[r[k] for k in KEYS] for r in on] == [[r[k] for k in KEYS] for r in off]
    assert counts_on == counts_off
    assert params_on.keys() == params_off.keys()
    assert all(torch.equal(params_on[n], params_off[n]) for n in params_off)


def test_dualpipev_overlap_is_bitwise_the_sequential_run(worker_groups):
    _same(worker_groups, "dualpipev")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["dualpipe", "1f1b"])
def test_overlap_is_bitwise_the_sequential_run(worker_groups, schedule):
    _same(worker_groups, schedule)
