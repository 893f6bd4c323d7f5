"""Run the reference trainer in this process, with a progress bar, a run directory and checkpoints.

The single-process twin of ``raymoe.runtime.launch.train_ray``: the same run directory, the same checkpoints
(one shard; ``run.checkpoint_every``, at the end, and on SIGTERM/Ctrl-C), ``resume=`` to continue exactly, the
same NaN guard. No worker can fail here, so there is no recovery.
"""

from __future__ import annotations

from pathlib import Path

from raymoe.checkpoint import Manifest
from raymoe.checkpoint.compat import check_steps
from raymoe.config import Config
from raymoe.evaluate import PeriodicEval
from raymoe.train.loop import TrainLoop
from raymoe.train.preflight import preflight
from raymoe.train.reference import ReferenceTrainer
from raymoe.train.run_dir import RunDir
from raymoe.train.saving import open_store
from raymoe.train.stop import StopRequests


def train_local(
    config: Config, *, out_dir: str | None = None, progress: bool = True, resume: str | Path | None = None,
    reshard: bool = False, overwrite: bool = False,
) -> list[dict]:
    """``overwrite``: a fresh run may start in a directory holding an earlier run (which is set aside)."""
    out_dir = out_dir or config.run.out_dir
    preflight(config, out_dir, engine="local", fresh=resume is None, overwrite=overwrite)  # before any write
    trainer = ReferenceTrainer(config, device=config.parallel.device)
    evals = PeriodicEval(config)
    if resume is not None:  # refused before anything is written if it does not continue this config
        check_steps(Manifest.read(Path(resume)), config.run.steps, source=str(resume))
        trainer.restore(Path(resume), reshard=reshard)
    run_dir = RunDir(out_dir, config, resume_step=trainer.step_index if resume else None, overwrite=overwrite)
    store = open_store(config, run_dir, fresh=resume is None)
    if resume is not None:
        run_dir.event("resumed", step=trainer.step_index, checkpoint=str(resume), resharded=reshard)
    loop = TrainLoop(config, _LocalEngine(trainer, evals), store, run_dir, desc="train (local)", engine_name="local",
                     last_checkpoint=Path(resume) if resume is not None else None)
    try:
        with StopRequests() as stop:
            loop.run(stop, progress)
    finally:
        loop.close()
        run_dir.close()
    return run_dir.records


class _LocalEngine:
    """The reference trainer as the loop's ``StepEngine``."""

    def __init__(self, trainer: ReferenceTrainer, evals: PeriodicEval) -> None:
        self.trainer, self.evals = trainer, evals

    @property
    def step_index(self) -> int:
        return self.trainer.step_index

    def run_step(self) -> tuple[dict, tuple]:
        record = self.trainer.step()
        record.update(self.evals.after_step(self.trainer.step_index, self.trainer.model, self.trainer.routing_bias_RE))
        return record, ()

    def save(self, store) -> Path:
        return self.trainer.save_checkpoint(store)
