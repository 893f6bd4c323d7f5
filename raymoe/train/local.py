"""Run the reference trainer in this process, with a progress bar, a run directory and checkpoints.

The single-process twin of ``raymoe.runtime.launch.train_ray``: the same run directory, the same checkpoints
(one shard; ``run.checkpoint_every``, at the end, and on SIGTERM/Ctrl-C), ``resume=`` to continue exactly, the
same NaN guard. No worker can fail here, so there is no recovery.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from raymoe.checkpoint import Manifest
from raymoe.checkpoint.compat import check_steps
from raymoe.config import Config
from raymoe.evaluate import PeriodicEval
from raymoe.train.metrics import check_finite
from raymoe.train.preflight import preflight
from raymoe.train.reference import ReferenceTrainer
from raymoe.train.run_dir import RunDir
from raymoe.train.saving import checkpoint_due, log_stop, open_store, save_logged
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
    last_checkpoint = Path(resume) if resume is not None else None
    if resume is not None:
        run_dir.event("resumed", step=trainer.step_index, checkpoint=str(resume), resharded=reshard)
    bar = tqdm(total=config.run.steps, initial=trainer.step_index, desc="train (local)", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        with StopRequests() as stop:
            while trainer.step_index < config.run.steps:
                record = trainer.step()
                record.update(evals.after_step(trainer.step_index, trainer.model, trainer.routing_bias_RE))
                run_dir.log(record)
                check_finite(record, last_checkpoint=last_checkpoint)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", mtp=f"{record['mtp_loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if checkpoint_due(config, trainer.step_index) or (stop.requested and config.run.checkpoint_on_stop):
                    last_checkpoint, _, _ = save_logged(lambda: trainer.save_checkpoint(store), trainer.step_index,
                                                        run_dir, bar)
                if stop.requested:
                    log_stop(stop.signal_name, trainer.step_index, config, run_dir, bar, engine="local")
                    break
    finally:
        bar.close()
        run_dir.close()
    return run_dir.records
