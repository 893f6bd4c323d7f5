"""Run raymoe like a Ray user: ``ray job submit`` the CPU smoke job to a real local head, then stop a job.

The head is private to this module (tests/_local_ray.py: free ports, own temp dir, own auth token) and is
stopped in a finally block. Everything goes through the ``ray job`` CLI, as a user would type it; the status
is polled from the job REST API the CLI itself uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from _local_ray import BIN, REPO, LocalHead

from raymoe.report import write_report

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMOKE = "jobs/configs/cpu_smoke.yaml"


@contextlib.contextmanager
def another_ray():
    """Another local Ray instance, started first with Ray's default ports (its dashboard agent holds 52365), as
    on a machine shared with other people: with it, our head's job submission used to fail (issue 21)."""
    code = ("import sys, ray; ray.init(num_cpus=1, configure_logging=False); print('up', flush=True); "
            "sys.stdin.read(); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up", "the other Ray instance did not start"
        yield proc
    finally:
        proc.stdin.close()  # it shuts its Ray down and exits
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # only the process group we started
            proc.wait()


@pytest.fixture(scope="module")
def head():
    """Our private head, started while another local Ray instance runs (``another_ray`` is a context manager, not
    a fixture, so that modules importing ``head`` from here need nothing else)."""
    with another_ray():
        local = LocalHead(num_cpus=4, dashboard=True)
        try:
            yield local.start()
        finally:
            local.stop()


def ray_job(head: LocalHead, command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ray job <command> --address <our head> <args>`` (the address before any ``--`` entrypoint)."""
    return subprocess.run([str(BIN / "ray"), "job", command, "--address", head.dashboard_url, *args],
                          env=head.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def job_info(head: LocalHead, submission_id: str) -> dict:
    request = urllib.request.Request(f"{head.dashboard_url}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def actor_names(head: LocalHead, job_id: str) -> set[str]:
    """Names of the job's actors, as the dashboard's Actors page lists them (state API)."""
    request = urllib.request.Request(f"{head.dashboard_url}/api/v0/actors?limit=1000&detail=true",
                                     headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        actors = json.loads(response.read())["data"]["result"]["result"]
    return {a["name"] for a in actors if a.get("job_id") == job_id and a.get("name")}


def wait_for(head: LocalHead, submission_id: str, statuses: set[str], timeout_s: float = 420) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = job_info(head, submission_id)
        if info["status"] in statuses:
            return info
        if info["status"] in {"FAILED", "STOPPED", "SUCCEEDED"}:
            logs = ray_job(head, "logs", submission_id).stdout
            pytest.fail(f"job {submission_id} ended {info['status']} ({info.get('message')}):\n{logs[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {submission_id} still {info['status']} after {timeout_s} s:\n{head.log_tail()}")
        time.sleep(1.0)


def submit(head: LocalHead, submission_id: str, *train_args: str, config: str | None = SMOKE,
           agent_wait_s: float = 60) -> None:
    """``ray job submit``; while the head answers "No available agent" (its job agent registers with the
    dashboard a little after both are up), try again for up to ``agent_wait_s``, then fail saying so."""
    metadata = {"raymoe_config": str(config), "description": "raymoe CPU smoke job (tests/test_jobs.py)"}
    config_args = ("--config", config) if config else ()
    deadline = time.monotonic() + agent_wait_s
    while True:
        result = ray_job(head, "submit", "--no-wait", "--submission-id", submission_id,
                         "--metadata-json", json.dumps(metadata),
                         "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml",
                         "--", "python", "-m", "raymoe", "train", *config_args, *train_args)
        output = result.stdout + result.stderr
        if result.returncode == 0 or "No available agent" not in output:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"the head's job agent never became available in {agent_wait_s} s:\n{output[-2000:]}")
        time.sleep(2.0)
    assert result.returncode == 0, output


def test_submit_without_the_token_is_refused(head):
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_TOKEN_PATH"] = "/nonexistent"  # and not ~/.ray/auth_token either
    result = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.dashboard_url], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Authentication" in result.stdout + result.stderr


def test_cpu_smoke_job_succeeds(head, tmp_path):
    run_dir = tmp_path / "smoke"
    submission_id = f"raymoe-cpu-smoke-{uuid.uuid4().hex[:6]}"
    submit(head, submission_id, "--out", str(run_dir))
    info = wait_for(head, submission_id, {"SUCCEEDED"})
    assert info["metadata"]["raymoe_config"] == SMOKE
    assert info["entrypoint"].startswith("python -m raymoe train --config jobs/configs/cpu_smoke.yaml")
    assert {"raymoe/pp0-ep0-dp0", "raymoe/pp1-ep0-dp0"} <= actor_names(head, info["job_id"])
    logs = ray_job(head, "logs", submission_id).stdout
    assert "done: 4 steps" in logs, logs[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[0]["engine"] == "ray" and rows[0]["pp"] == 2
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.parquet").is_file()
    report = write_report(run_dir)
    assert report.summary_path.is_file()


def test_stopped_job_leaves_an_intact_run_directory_and_a_usable_checkpoint(head, tmp_path):
    run_dir = tmp_path / "stopped"
    submission_id = f"raymoe-cpu-stop-{uuid.uuid4().hex[:6]}"
    submit(head, submission_id, "--out", str(run_dir), "--steps", "100000")
    wait_for(head, submission_id, {"RUNNING"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, f"no steps logged:\n{ray_job(head, 'logs', submission_id).stdout}"
        assert job_info(head, submission_id)["status"] == "RUNNING"
        time.sleep(1.0)
    result = ray_job(head, "stop", submission_id)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(head, submission_id, {"STOPPED"}, timeout_s=120)
    # Every completed step is on disk and parses; at most the line being written when SIGKILL came is torn.
    lines = metrics.read_text().splitlines()
    complete = []
    for line in lines:
        try:
            complete.append(json.loads(line))
        except json.JSONDecodeError:
            assert line is lines[-1], "only the last line may be torn"
    assert len(complete) >= 2 and [r["step"] for r in complete] == list(range(len(complete)))
    assert (run_dir / "config.yaml").is_file()
    # Ray turns SIGTERM into SystemExit in its drivers, so the trainer's finally blocks close the run directory
    # (jobs/runtime_env.yaml gives them RAY_JOB_STOP_WAIT_TIME_S=30 before SIGKILL): the Parquet copy is written.
    # (loss.png comes after it and was once missing on a loaded machine; the report below redraws it anyway.)
    import pyarrow.parquet as pq

    assert pq.read_table(run_dir / "metrics.parquet").num_rows == len(complete)
    text = write_report(run_dir).summary_path.read_text()  # the stopped run still gets its report
    assert f"{len(complete)} steps" in text

    # SIGTERM let the step in flight finish and saved a checkpoint of exactly the steps logged.
    from raymoe.checkpoint import Manifest, resolve_checkpoint

    logs = ray_job(head, "logs", submission_id).stdout
    assert f"stopped by SIGTERM after step {len(complete)}" in logs, logs[-3000:]
    checkpoint = resolve_checkpoint(run_dir)
    assert Manifest.read(checkpoint).step == len(complete)

    # ... and it is usable: a second job resumes the run and takes it two steps further.
    resumed_id = f"raymoe-cpu-resume-{uuid.uuid4().hex[:6]}"
    target = len(complete) + 2
    submit(head, resumed_id, "--resume", str(run_dir), "--steps", str(target), config=None)
    wait_for(head, resumed_id, {"SUCCEEDED"})
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(target))
    events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    stop = events.index("stopped")  # periodic checkpoints (cpu_smoke saves every 2 steps) come before it
    assert events[stop - 1 : stop + 2] == ["checkpoint", "stopped", "resumed"]
