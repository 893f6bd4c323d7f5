"""``train_ray(config)``: the Ray twin of ``raymoe.train.local.train_local`` (same progress bar, same run directory).

``run.ray_address`` empty starts an embedded single-node Ray (``ray.init()``), unless ``RAY_ADDRESS`` is set;
``auto`` or an address joins a running cluster (``ray job submit`` sets RAY_ADDRESS for its entrypoint).
"""

from __future__ import annotations

import os

from tqdm import tqdm

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


def train_ray(config: Config, *, out_dir: str | None = None, progress: bool = True) -> list[dict]:
    import ray

    from raymoe.runtime.driver import Driver
    from raymoe.runtime.metrics import MetricsExporter

    driver = Driver(config)  # validates the layout before Ray is even started
    started = init_ray(config.run.ray_address)
    run_dir = RunDir(out_dir or config.run.out_dir, config)
    exporter = MetricsExporter.for_run(config, run_dir.path)  # dashboard metrics + RUN_DIR/actions.jsonl
    bar = None
    try:
        driver.start()
        desc = f"train (ray {config.schedule.name} pp={config.parallel.pp} dp={config.parallel.dp})"
        bar = tqdm(total=config.run.steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
        for _ in range(config.run.steps):
            report = driver.step()
            record = report.record
            run_dir.log(record)
            exporter.record(record, report.results)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", mtp=f"{record['mtp_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
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
