"""What both trainers (the Ray driver's loop and the single-process one) do around a checkpoint or a stop:
decide when one is due, save it, and leave a line in the progress bar and in ``events.jsonl``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from raymoe.checkpoint import CheckpointStore
from raymoe.config import Config
from raymoe.train.run_dir import RunDir


def checkpoint_root(config: Config, run_dir: Path) -> Path:
    """``run.checkpoint_dir`` (relative to the current directory, like ``--out``), else ``RUN_DIR/checkpoints``."""
    return Path(config.run.checkpoint_dir) if config.run.checkpoint_dir else Path(run_dir) / "checkpoints"


def open_store(config: Config, run_dir: RunDir, *, fresh: bool) -> CheckpointStore:
    """The run's checkpoint store (``checkpoint_root``). A fresh run (not a resume) first moves an earlier run's
    checkpoints aside, so that neither can be mistaken for the other's (``RUN_DIR/checkpoints`` was already
    set aside with the rest of an earlier run by ``RunDir``; this covers a ``run.checkpoint_dir`` elsewhere)."""
    store = CheckpointStore(checkpoint_root(config, run_dir.path), keep=config.run.keep_checkpoints)
    if fresh and (aside := store.set_aside()) is not None:
        print(f"{store.root} held an earlier run's checkpoints: moved to {aside}")
    return store


def checkpoint_due(config: Config, steps_done: int) -> bool:
    """Every ``run.checkpoint_every`` steps, and after the last step (unless checkpointing is off)."""
    every = config.run.checkpoint_every
    return every > 0 and (steps_done % every == 0 or steps_done == config.run.steps)


def save_logged(save: Callable[[], Path], step: int, run_dir: RunDir, bar) -> tuple[Path, float, int]:
    """Run ``save`` (it returns the committed checkpoint); returns (path, seconds, bytes on disk)."""
    start = time.perf_counter()
    path = save()
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.iterdir())
    run_dir.event("checkpoint", step=step, path=str(path), seconds=seconds, bytes=size)
    bar.write(f"checkpoint {path} ({size / 2**20:.1f} MiB, {seconds:.1f} s)")
    return path, seconds, size


def log_stop(signal_name: str, step: int, config: Config, run_dir: RunDir, bar, *, engine: str = "") -> None:
    flags = " --engine local" if engine == "local" else ""
    bar.write(f"stopped by {signal_name} after step {step}; continue with "
              f"`python -m raymoe train{flags} --resume {run_dir.path} --steps {config.run.steps}`")
    run_dir.event("stopped", step=step, signal=signal_name)
