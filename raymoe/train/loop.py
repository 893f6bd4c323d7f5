"""The one training loop both trainers run: the single-process reference (``train_local``) and the Ray driver
(``raymoe.runtime.launch.train_ray``). Each step: run it, log the record, check it is finite, show progress;
then checkpoint when due or when a stop was asked for, and stop after the step in flight.

What differs between the trainers is behind a small ``StepEngine``: how a step runs (with its periodic
evaluation), how a checkpoint is saved, and, on the Ray side only, what a step's result feeds besides the run
directory (dashboard metrics) and how a worker failure is recovered from (``Recovery``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from raymoe.checkpoint import CheckpointStore
from raymoe.config import Config
from raymoe.train.metrics import check_finite
from raymoe.train.run_dir import RunDir
from raymoe.train.saving import checkpoint_due, log_stop, save_logged


class StepEngine(Protocol):
    step_index: int

    def run_step(self) -> tuple[dict, Sequence]:
        """One optimizer step: its metrics record (periodic evaluation included) and the per-worker results."""
        ...

    def save(self, store: CheckpointStore) -> Path:
        ...


class Recovery(Protocol):
    def applies(self, error: Exception) -> bool:
        """Whether the failure policy retries ``error`` (the driver is then RECOVERING)."""
        ...

    def recover(self, error: Exception, loop: TrainLoop) -> None:
        ...


class TrainLoop:
    def __init__(self, config: Config, engine: StepEngine, store: CheckpointStore, run_dir: RunDir, *,
                 desc: str, engine_name: str = "", last_checkpoint: Path | None = None,
                 on_step: Callable[[dict, Sequence], None] | None = None,
                 on_save: Callable[[float, int], None] | None = None, recovery: Recovery | None = None) -> None:
        self.config, self.engine, self.store, self.run_dir = config, engine, store, run_dir
        self.desc, self.engine_name = desc, engine_name
        self.last_checkpoint = last_checkpoint
        """Only checkpoints of this run (or the one it resumed from) are recovered from or named by the NaN guard."""
        self.on_step, self.on_save, self.recovery = on_step, on_save, recovery
        self.bar = None

    def run(self, stop, progress: bool) -> None:
        config, engine = self.config, self.engine
        self.bar = tqdm(total=config.run.steps, initial=engine.step_index, desc=self.desc, unit="step",
                        disable=not progress, dynamic_ncols=True)
        while engine.step_index < config.run.steps:
            try:
                self._step()
                if checkpoint_due(config, engine.step_index) or (stop.requested and config.run.checkpoint_on_stop):
                    self._save()  # checked after the step: a stop signal may have come during it
            except Exception as exc:
                if self.recovery is None or not self.recovery.applies(exc):
                    raise
                self.recovery.recover(exc, self)
                continue
            if stop.requested:
                log_stop(stop.signal_name, engine.step_index, config, self.run_dir, self.bar,
                         engine=self.engine_name)
                return

    def _step(self) -> None:
        record, results = self.engine.run_step()
        self.run_dir.log(record)
        if self.on_step is not None:
            self.on_step(record, results)
        check_finite(record, last_checkpoint=self.last_checkpoint)  # a diverged run saves nothing more
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", mtp=f"{record['mtp_loss']:.3f}",
                             tok_s=f"{record['tokens_per_s']:.0f}")

    def _save(self) -> None:
        path, seconds, size = save_logged(lambda: self.engine.save(self.store), self.engine.step_index,
                                          self.run_dir, self.bar)
        self.last_checkpoint = path
        if self.on_save is not None:
            self.on_save(seconds, size)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
