"""``ray job submit`` of the expert-parallel job (jobs/configs/cpu_ep.yaml: pp=2 x ep=2, DualPipeV) to a real
local head: the four workers start under their pp/ep/dp names and the run logs its all-to-all traffic."""

from __future__ import annotations

import json
import uuid

import pytest
from test_jobs import actor_names, head, ray_job, submit, wait_for  # noqa: F401 - head is a fixture

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EP_JOB = "jobs/configs/cpu_ep.yaml"


def test_expert_parallel_job_succeeds(head, tmp_path):  # noqa: F811 - the imported fixture
    run_dir = tmp_path / "ep"
    submission_id = f"raymoe-cpu-ep-{uuid.uuid4().hex[:6]}"
    submit(head, submission_id, "--out", str(run_dir), "--steps", "4", config=EP_JOB)
    info = wait_for(head, submission_id, {"SUCCEEDED"})
    expected = {f"raymoe/pp{p}-ep{e}-dp{d}" for p in (0, 1) for d in (0, 1) for e in (d % 2,)}
    assert expected <= actor_names(head, info["job_id"])
    assert "done: 4 steps" in ray_job(head, "logs", submission_id).stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["ep"] for r in rows] == [2] * 4
    assert all(0 < r["a2a_dedup_bytes"] <= r["a2a_naive_bytes"] for r in rows)
