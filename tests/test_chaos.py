"""Chaos: faults injected the way real failures happen, and the run ends bitwise as if nothing happened (issue 21).

* Worker *processes* get SIGKILL (not ``ray.kill``, which asks Ray to end the actor) at random steps and in the
  middle of a checkpoint save, three times in one run; the driver replaces the workers and goes back to the last
  committed checkpoint each time.
* The same for DeepSpeed ZeRO-1 over dp=2.
* The driver process gets SIGKILL in the middle of a checkpoint save; ``--resume`` continues from the newest
  complete checkpoint (the half-written one is never read, and is swept at the next commit).

The final per-step losses, MTP losses, gradient norms and MaxVio must be bitwise those of an undisturbed run,
and no complete checkpoint may be lost. Steps are drawn from a seeded RNG, so a failure is reproducible.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from raymoe.checkpoint import CheckpointStore, resolve_checkpoint
from raymoe.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SEED = 2126


def _losses(records):
    return [(r["step"], r["loss"], r["mtp_loss"], r["grad_norm"], r["max_vio"]) for r in records]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _worker_processes(root: psutil.Process | None = None) -> list[psutil.Process]:
    """Our raymoe worker actors: descendants of this process (its ``ray.init`` started the raylet that forked
    them), whose title Ray sets to ``ray::Worker...``. Other people's Ray instances are never touched."""
    root = root or psutil.Process()
    found = []
    for proc in root.children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::Worker"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _saving(checkpoints: Path) -> list[Path]:
    """Staging directories of a save in progress (``.step-N.tmp-*``, renamed to ``step-N`` at its commit)."""
    if not checkpoints.is_dir():
        return []
    return [p for p in checkpoints.iterdir() if p.name.startswith(".step-") and ".tmp-" in p.name]


class WorkerKiller(threading.Thread):
    """SIGKILL one of our worker processes when ``metrics.jsonl`` reaches each step of ``at_steps``, and once
    while a checkpoint is being saved (the first save it catches after ``save_after``)."""

    def __init__(self, run_dir: Path, *, at_steps: list[int], save_after: int | None, rng: random.Random):
        super().__init__(daemon=True)
        self.run_dir, self.at_steps, self.save_after, self.rng = run_dir, sorted(at_steps), save_after, rng
        self.kills: list[dict] = []
        self.stop = threading.Event()

    def _kill(self, why: str, **extra) -> bool:
        workers = _worker_processes()
        if not workers:
            return False
        victim = self.rng.choice(sorted(workers, key=lambda p: p.pid))
        os.kill(victim.pid, signal.SIGKILL)
        self.kills.append({"why": why, "pid": victim.pid, "logged": _logged(self.run_dir), **extra})
        # Aim again only once the driver has recovered (new workers, new pids).
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not self.stop.is_set() and \
                len(_recoveries(self.run_dir)) < len(self.kills):
            time.sleep(0.1)
        return True

    def run(self) -> None:
        checkpoints = self.run_dir / "checkpoints"
        pending = list(self.at_steps)
        save_pending = self.save_after is not None
        while not self.stop.is_set() and (pending or save_pending):
            if save_pending and _logged(self.run_dir) >= self.save_after and (staging := _saving(checkpoints)):
                step = int(staging[0].name.split(".")[1].split("-")[1])
                if self._kill("during a checkpoint save", step=step):
                    # Only a kill before the commit counts as "during the save": the step-N directory must not
                    # exist yet (the rename that commits it had not happened).
                    self.kills[-1]["before_commit"] = not (checkpoints / f"step-{step:08d}").exists()
                    save_pending = not self.kills[-1]["before_commit"]
                continue
            if pending and _logged(self.run_dir) >= pending[0]:
                if self._kill("at a random step", step=pending[0]):
                    pending.pop(0)
                continue
            time.sleep(0.002)


def _recoveries(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [e for e in events if e["event"] == "recovered"]


def _chaos_run(worker_groups, tmp_path, overrides, *, kills_at_steps, kill_during_save_after):
    from raymoe.runtime.launch import train_ray

    worker_groups.close()  # train_ray starts its own workers under the same actor names
    config = load_config("debug", overrides)
    calm = train_ray(config, out_dir=str(tmp_path / "calm"), progress=False)
    out = tmp_path / "chaos"
    killer = WorkerKiller(out, at_steps=kills_at_steps, save_after=kill_during_save_after,
                          rng=random.Random(SEED))
    killer.start()
    try:
        records = train_ray(config, out_dir=str(out), progress=False)
    finally:
        killer.stop.set()
        killer.join(30)
    recovered = [(r["failed_at_step"], r["resumed_at_step"], round(r["seconds"], 1)) for r in _recoveries(out)]
    print(f"\nkills: {killer.kills}\nrecoveries (failed at, resumed at, seconds): {recovered}")
    return calm, records, out, killer.kills


def test_worker_processes_killed_at_random_steps_and_mid_save_change_nothing(worker_groups, tmp_path):
    rng = random.Random(SEED)
    steps = 24
    at = sorted(rng.sample(range(2, steps - 4), 2))
    calm, records, out, kills = _chaos_run(
        worker_groups, tmp_path,
        [f"run.steps={steps}", "run.checkpoint_every=4", "run.max_failures=5", "parallel.pp=2",
         "schedule.name=dualpipev", "schedule.num_microbatches=4"],
        kills_at_steps=at, kill_during_save_after=at[0] + 1)
    assert len(kills) >= 3 and sum(k.get("before_commit", False) for k in kills) == 1, kills
    assert len(_recoveries(out)) == len(kills)
    assert _losses(records) == _losses(calm)  # bitwise, every step
    assert _losses(_rows(out)) == _losses(calm)  # and so is what is on disk
    store = CheckpointStore(out / "checkpoints")
    assert [s for s, _ in store.complete()] == [16, 20, 24]  # nothing lost: the newest keep_checkpoints=3
    assert not _saving(out / "checkpoints")  # half-written saves were swept by later commits


def test_zero1_dp2_survives_a_killed_worker_process(worker_groups, tmp_path):
    calm, records, out, kills = _chaos_run(
        worker_groups, tmp_path,
        ["run.steps=12", "run.checkpoint_every=4", "run.max_failures=2", "parallel.dp=2", "parallel.zero_stage=1",
         "schedule.num_microbatches=2"],
        kills_at_steps=[random.Random(SEED).randrange(5, 10)], kill_during_save_after=None)
    assert len(kills) == 1 and len(_recoveries(out)) == 1
    assert _losses(records) == _losses(calm)


def _driver(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "raymoe", "train", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's whole session: the driver first (the fault), then the local Ray it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_driver_killed_mid_save_resumes_bitwise(worker_groups, tmp_path):
    from raymoe.runtime.launch import train_ray

    worker_groups.close()
    args = ["--preset", "debug", "--steps", "16", "--checkpoint-every", "2", "parallel.pp=2",
            "schedule.name=1f1b", "schedule.num_microbatches=4"]
    overrides = ["run.steps=16", "run.checkpoint_every=2", "parallel.pp=2", "schedule.name=1f1b",
                 "schedule.num_microbatches=4"]
    calm = train_ray(load_config("debug", overrides), out_dir=str(tmp_path / "calm"), progress=False)

    out = tmp_path / "run"
    target = random.Random(SEED).randrange(6, 12)  # kill in the save after this many steps are logged
    proc = _driver([*args, "--out", str(out)], tmp_path / "driver.log")
    killed_in = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            staging = _saving(out / "checkpoints")
            if staging and _logged(out) >= target:
                os.kill(proc.pid, signal.SIGKILL)  # the driver process itself, mid-save
                killed_in = staging[0]
                break
            time.sleep(0.002)
    finally:
        _kill_group(proc)
    assert killed_in is not None, (tmp_path / "driver.log").read_text()[-3000:]
    step = int(killed_in.name.split(".")[1].split("-")[1])
    complete = [s for s, _ in CheckpointStore(out / "checkpoints").complete()]
    assert step not in complete and complete[-1] == step - 2, (step, complete)  # the half save is not a checkpoint
    assert resolve_checkpoint(out).name == f"step-{step - 2:08d}"

    resumed = subprocess.run([sys.executable, "-m", "raymoe", "train", "--resume", str(out), "--steps", "16"],
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu",
                                                RAY_USAGE_STATS_ENABLED="0"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _losses(_rows(out)) == _losses(calm)  # every step, bitwise, including the ones redone
    assert [s for s, _ in CheckpointStore(out / "checkpoints").complete()] == [12, 14, 16]
    assert not _saving(out / "checkpoints")
    print(f"\ndriver killed while saving step {step} ({killed_in.name}); resumed from step {step - 2}")
