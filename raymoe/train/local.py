"""Run the reference trainer in this process, with a progress bar and a run directory."""

from __future__ import annotations

from tqdm import tqdm

from raymoe.config import Config
from raymoe.train.metrics import check_finite
from raymoe.train.reference import ReferenceTrainer
from raymoe.train.run_dir import RunDir


def train_local(config: Config, *, out_dir: str | None = None, progress: bool = True) -> list[dict]:
    run_dir = RunDir(out_dir or config.run.out_dir, config)
    trainer = ReferenceTrainer(config)
    bar = tqdm(range(config.run.steps), desc="train (local)", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for _ in bar:
            record = trainer.step()
            run_dir.log(record)
            check_finite(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", mtp=f"{record['mtp_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
    finally:
        run_dir.close()
    return run_dir.records
