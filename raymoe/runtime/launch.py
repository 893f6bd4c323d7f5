"""``train_ray(config)``: the Ray twin of ``raymoe.train.local.train_local`` (same progress bar, same run directory).

``run.ray_address`` empty starts an embedded single-node Ray (``ray.init()``), unless ``RAY_ADDRESS`` is set;
``auto`` or an address joins a running cluster (``ray job submit`` sets RAY_ADDRESS for its entrypoint).

Checkpoints (``raymoe.checkpoint``): every ``run.checkpoint_every`` steps and at the end of the run, and when the
run is stopped (SIGTERM from ``ray job stop``, or Ctrl-C; ``runtime/stop.py``) after the step in flight.
``resume=`` continues from a checkpoint: the workers load their shards, the driver its step, token count,
routing biases and data cursor, and the run directory keeps its metrics and appends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm import tqdm

from raymoe.checkpoint import CheckpointStore, Manifest
from raymoe.checkpoint.compat import check_compatible, check_steps, config_of
from raymoe.config import Config
from raymoe.train.run_dir import RunDir


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
    config: Config, *, out_dir: str | None = None, progress: bool = True, resume: str | Path | None = None
) -> list[dict]:
    """Train ``config`` on Ray actors; with ``resume`` (a checkpoint directory) continue that run to run.steps."""
    import ray

    from raymoe.runtime.driver import Driver
    from raymoe.runtime.metrics import MetricsExporter
    from raymoe.runtime.stop import StopRequests

    driver = Driver(config)  # validates the layout before Ray is even started
    manifest = None
    if resume is not None:  # so is the checkpoint: readable, same model and layout, steps left to train
        manifest = Manifest.read(Path(resume))
        check_compatible(config_of(manifest), config, source=str(resume))
        check_steps(manifest, config.run.steps, source=str(resume))
    started = init_ray(config.run.ray_address)
    run_dir = RunDir(out_dir or config.run.out_dir, config, resume_step=manifest.step if manifest else None)
    store = CheckpointStore(config.run.checkpoint_root, keep=config.run.keep_checkpoints)
    exporter = MetricsExporter.for_run(config, run_dir.path)  # dashboard metrics + RUN_DIR/actions.jsonl
    bar = None
    try:
        with StopRequests() as stop:
            driver.start()
            if config.run.checkpoint_every or config.run.checkpoint_on_stop:
                driver.check_checkpoint_storage(store)
            if manifest is not None:
                driver.restore(Path(resume))
                run_dir.event("resumed", step=driver.step_index, checkpoint=str(resume))
            desc = f"train (ray {config.schedule.name} pp={config.parallel.pp} dp={config.parallel.dp})"
            bar = tqdm(total=config.run.steps, initial=driver.step_index, desc=desc, unit="step",
                       disable=not progress, dynamic_ncols=True)
            while driver.step_index < config.run.steps:
                report = driver.step()
                record = report.record
                run_dir.log(record)
                exporter.record(record, report.results)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", mtp=f"{record['mtp_loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if _checkpoint_due(config, driver.step_index) or (stop.requested and config.run.checkpoint_on_stop):
                    _save(driver, store, run_dir, bar)
                if stop.requested:
                    bar.write(f"stopped by {stop.signal_name} after step {driver.step_index}; continue with "
                              f"`python -m raymoe train --resume {run_dir.path} --steps {config.run.steps}`")
                    run_dir.event("stopped", step=driver.step_index, signal=stop.signal_name)
                    break
            driver.finish()
    finally:
        if bar is not None:
            bar.close()
        driver.close()
        exporter.close()
        run_dir.close()
        if started:
            ray.shutdown()
    return run_dir.records


def _checkpoint_due(config: Config, steps_done: int) -> bool:
    every = config.run.checkpoint_every
    return every > 0 and (steps_done % every == 0 or steps_done == config.run.steps)


def _save(driver, store: CheckpointStore, run_dir: RunDir, bar) -> None:
    start = time.perf_counter()
    path = driver.save_checkpoint(store)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.iterdir())
    run_dir.event("checkpoint", step=driver.step_index, path=str(path), seconds=seconds, bytes=size)
    bar.write(f"checkpoint {path} ({size / 2**20:.1f} MiB, {seconds:.1f} s)")
