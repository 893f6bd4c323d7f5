"""Evaluation every ``run.eval_every`` steps of a training run, into that step's metrics record.

The single-process trainer evaluates its live model. The Ray driver's weights live in its workers, which expose
no forward outside the schedule, so it evaluates a checkpoint instead: at a due step the driver saves one into a
scratch store ``.eval-scratch`` inside the checkpoint directory (storage every worker is known to see; the
workers' ordinary shard save, ~0.2 s for ``small``), the shards are consolidated here, evaluated and deleted.
Both give the same numbers for the same weights.

The record gains ``eval_loss``, ``eval_perplexity``, ``eval_bits_per_byte``, ``eval_tokens``, ``eval_bytes``
(metrics.jsonl; the Ray metrics exporter publishes record fields it knows by name).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from raymoe.config import Config
from raymoe.evaluate.heldout import evaluate, load_stream


class PeriodicEval:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.every = config.run.eval_every
        self._stream = None

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and (steps_done % self.every == 0 or steps_done == self.config.run.steps)

    @property
    def stream(self):
        if self._stream is None:  # read once, on first use
            self._stream = load_stream(self.config.run.eval_data or self.config.data.path)
        return self._stream

    def of_model(self, model, bias_RE: torch.Tensor) -> dict:
        model.set_routing_biases(bias_RE)  # the biases after this step's update, as a checkpoint would hold
        result = evaluate(model, self.stream, seq_len=self.config.data.seq_len,
                          batch_size=self.config.data.batch_size, max_tokens=self.config.run.eval_tokens)
        return result.to_dict("eval_")

    def after_step(self, steps_done: int, model, bias_RE: torch.Tensor) -> dict:
        """The single-process trainer's hook: {} unless due."""
        return self.of_model(model, bias_RE) if self.due(steps_done) else {}

    def after_ray_step(self, driver, run_dir: Path) -> dict:
        """The Ray loop's hook: {} unless due; else save, consolidate, evaluate and delete a scratch checkpoint."""
        if not self.due(driver.step_index):
            return {}
        from raymoe.checkpoint import CheckpointStore
        from raymoe.checkpoint.export import consolidate
        from raymoe.model import build_model

        root = Path(self.config.run.checkpoint_dir or Path(run_dir) / "checkpoints") / ".eval-scratch"
        try:
            path = driver.save_checkpoint(CheckpointStore(root, keep=1))
            tensors, manifest = consolidate(path)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        model = build_model(self.config)
        model.load_state_dict(tensors, strict=False)  # parameters; the gate biases are set below
        return self.of_model(model, torch.tensor(manifest.routing_bias_RE, dtype=torch.float32))
