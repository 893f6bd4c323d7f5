"""``train_ray(config)``: the Ray twin of ``raymoe.train.local.train_local`` (same progress bar, same run directory).

``run.ray_address`` empty starts an embedded single-node Ray (``ray.init()``), unless ``RAY_ADDRESS`` is set;
``auto`` or an address joins a running cluster (``ray job submit`` sets RAY_ADDRESS for its entrypoint).

Checkpoints (``raymoe.checkpoint``): every ``run.checkpoint_every`` steps and at the end of the run, and when the
run is stopped (SIGTERM from ``ray job stop``, or Ctrl-C; ``train/stop.py``) after the step in flight.
Failures: with ``run.max_failures`` > 0 a dead or failing worker does not end the run; the driver starts new
workers and goes back to this run's last checkpoint (``Driver.recover``), and the redone steps are logged again.
``resume=`` continues from a checkpoint: the workers load their shards, the driver its step, token count,
routing biases and data cursor, and the run directory keeps its metrics and appends. ``reshard=True`` continues
it in another layout (``raymoe.checkpoint.reshard``): the checkpoint is consolidated here, before Ray starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm import tqdm

from raymoe.checkpoint import Layout
from raymoe.checkpoint.compat import check_steps
from raymoe.checkpoint.run_state import read_run_state
from raymoe.config import Config
from raymoe.evaluate import PeriodicEval
from raymoe.runtime.driver import Driver, DriverState, FailFast, RestartFromCheckpoint
from raymoe.train.metrics import check_finite
from raymoe.train.run_dir import RunDir
from raymoe.train.saving import checkpoint_due, log_stop, open_store, save_logged


def init_ray(address: str = "", *, num_cpus: int | None = None) -> bool:
    """Connect to (or start) Ray unless already connected; returns True if this call started the connection.

    ``num_cpus`` sets the logical CPUs of a Ray started here (ignored when joining a cluster): the parity check
    asks for one per worker, since correctness does not need a core per worker.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    joining = bool(address) or bool(os.environ.get("RAY_ADDRESS"))
    ray.init(address=address or None, log_to_driver=True, num_cpus=None if joining else num_cpus)
    return True


def train_ray(
    config: Config, *, out_dir: str | None = None, progress: bool = True, resume: str | Path | None = None,
    reshard: bool = False,
) -> list[dict]:
    """Train ``config`` on Ray actors; with ``resume`` (a checkpoint directory) continue that run to run.steps,
    with ``reshard`` also when it was saved in another layout (or by the single-process trainer)."""
    import ray

    from raymoe.runtime.metrics import MetricsExporter
    from raymoe.train.stop import StopRequests

    policy = RestartFromCheckpoint(config.run.max_failures) if config.run.max_failures else FailFast()
    driver = Driver(config, failure_policy=policy)  # validates the layout before Ray is even started
    manifest = consolidated = None
    if resume is not None:  # so is the checkpoint: readable, same model and layout, steps left to train
        manifest, _ = read_run_state(Path(resume), config, Layout.of(config),
                                     num_routers=driver.routing_bias_RE.shape[0], reshard=reshard)
        check_steps(manifest, config.run.steps, source=str(resume))
        if reshard:  # every shard read and checked (and its optimizer index) before any actor starts
            from raymoe.checkpoint.reshard import consolidate_training_state

            consolidated = consolidate_training_state(Path(resume))
    started = init_ray(config.run.ray_address)
    run_dir = RunDir(out_dir or config.run.out_dir, config, resume_step=manifest.step if manifest else None)
    store = open_store(config, run_dir, fresh=manifest is None)
    exporter = MetricsExporter.for_run(config, run_dir.path)  # dashboard metrics + RUN_DIR/actions.jsonl
    loop = _Loop(config, driver, store, run_dir, exporter, policy, last_checkpoint=Path(resume) if resume else None)
    try:
        with StopRequests() as stop:
            driver.start()
            if config.run.checkpoint_every or config.run.checkpoint_on_stop:
                driver.check_checkpoint_storage(store)
            if manifest is not None:
                driver.restore(Path(resume), reshard=reshard, consolidated=consolidated)
                consolidated = None  # the workers hold their parts now
                run_dir.event("resumed", step=driver.step_index, checkpoint=str(resume), resharded=reshard)
            loop.run(stop, progress)
            driver.finish()
    finally:
        loop.close()
        driver.close()
        exporter.close()
        run_dir.close()
        if started:
            ray.shutdown()
    return run_dir.records


class _Loop:
    """The step loop: log, checkpoint when due or stopped, and on a worker failure that the policy retries,
    recover from this run's last checkpoint."""

    def __init__(self, config: Config, driver, store, run_dir: RunDir, exporter, policy, *, last_checkpoint):
        self.config, self.driver, self.store, self.run_dir = config, driver, store, run_dir
        self.exporter, self.policy = exporter, policy
        self.last_checkpoint: Path | None = last_checkpoint
        """Only checkpoints of this run (or the one it resumed from) are recovered from."""
        self.bar = None
        self.evals = PeriodicEval(config)

    def run(self, stop, progress: bool) -> None:
        config, driver = self.config, self.driver
        p = config.parallel
        desc = f"train (ray {config.schedule.name} pp={p.pp}{f' ep={p.ep}' if p.ep > 1 else ''} dp={p.dp})"
        self.bar = tqdm(total=config.run.steps, initial=driver.step_index, desc=desc, unit="step",
                        disable=not progress, dynamic_ncols=True)
        while driver.step_index < config.run.steps:
            try:
                self._step()
                if checkpoint_due(config, driver.step_index) or (stop.requested and config.run.checkpoint_on_stop):
                    self._save()  # checked after the step: a stop signal may have come during it
            except Exception as exc:
                if driver.state is not DriverState.RECOVERING:  # the failure policy did not retry it
                    raise
                self._recover(exc)
                continue
            if stop.requested:
                log_stop(stop.signal_name, driver.step_index, config, self.run_dir, self.bar)
                return

    def _step(self) -> None:
        report = self.driver.step()
        record = report.record
        record.update(self.evals.after_ray_step(self.driver, self.run_dir.path))
        self.run_dir.log(record)
        self.exporter.record(record, report.results)
        check_finite(record, last_checkpoint=self.last_checkpoint)  # a diverged run saves nothing more
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", mtp=f"{record['mtp_loss']:.3f}",
                             tok_s=f"{record['tokens_per_s']:.0f}")

    def _save(self) -> None:
        path, seconds, size = save_logged(lambda: self.driver.save_checkpoint(self.store), self.driver.step_index,
                                          self.run_dir, self.bar)
        self.last_checkpoint = path
        self.exporter.checkpoint(seconds, size)

    def _recover(self, error: Exception) -> None:
        failed_at = self.driver.step_index
        source = self.last_checkpoint
        self.bar.write(f"worker failure at step {failed_at} ({type(error).__name__}: {str(error)[:200]}); "
                       f"restarting the workers from {source or 'the start'} "
                       f"(failure {self.policy.failures} of {self.policy.max_failures})")
        start = time.perf_counter()
        self.driver.recover(source)
        self.exporter.recovery()
        self.run_dir.rewind(self.driver.step_index)
        self.run_dir.event("recovered", failed_at_step=failed_at, resumed_at_step=self.driver.step_index,
                           checkpoint=str(source) if source else None, error=f"{type(error).__name__}: {error}",
                           seconds=time.perf_counter() - start)
        self.bar.n = self.driver.step_index
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

