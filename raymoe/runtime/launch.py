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
import socket
import time
from pathlib import Path

from raymoe.checkpoint import Layout
from raymoe.checkpoint.compat import check_steps
from raymoe.checkpoint.run_state import read_run_state
from raymoe.config import Config
from raymoe.evaluate import PeriodicEval
from raymoe.runtime.driver import Driver, DriverState, FailFast, RestartFromCheckpoint, validate_layout
from raymoe.train.loop import TrainLoop
from raymoe.train.preflight import preflight
from raymoe.train.run_dir import RunDir
from raymoe.train.saving import open_store


def effective_address(address: str = "") -> tuple[str, str]:
    """(address, where it came from): ``run.ray_address``, else the RAY_ADDRESS environment variable (what
    ``ray.init`` itself would use), else '' (start a local Ray)."""
    if address and address != "auto":
        return address, "run.ray_address"
    env = os.environ.get("RAY_ADDRESS", "")
    if env:
        return env, "RAY_ADDRESS"
    return address, "run.ray_address"


def check_address(address: str, source: str = "run.ray_address", *, timeout_s: float = 5.0) -> None:
    """ValueError naming the address unless something accepts a TCP connection there. ``ray.init`` retries an
    unreachable head for minutes (a bogus host name forever, in trials); a TCP connect answers in milliseconds
    (or ``timeout_s``). '' and 'auto' are left to ``ray.init`` (it fails fast when no local cluster runs)."""
    if address in ("", "auto"):
        return
    if source == "RAY_ADDRESS":
        from raymoe.config.schema import check_ray_address

        try:
            check_ray_address(address)
        except ValueError as exc:
            raise ValueError(str(exc).replace("run.ray_address", "RAY_ADDRESS")) from None
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ValueError(f"{source}={address!r}: no Ray head answers there ({reason}); start one with "
                         f"`ray start --head`, or fix the address") from None


def init_ray(address: str = "", *, num_cpus: int | None = None) -> bool:
    """Connect to (or start) Ray unless already connected; returns True if this call started the connection.

    ``num_cpus`` sets the logical CPUs of a Ray started here (ignored when joining a cluster): the parity check
    asks for one per worker, since correctness does not need a core per worker. An address that nothing answers
    at is refused within seconds, naming it (``check_address``).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    target, source = effective_address(address)
    check_address(target, source)
    joining = bool(target)
    # A local Ray: the dashboard (the only listener Ray 2.60 lets one bind to an interface) stays on loopback
    # whatever RAY_DASHBOARD_HOST-style settings say; the gRPC servers listen on all interfaces regardless
    # (README, "Ports"), guarded by Ray's token authentication.
    local = {} if joining else {"num_cpus": num_cpus, "dashboard_host": "127.0.0.1"}
    try:
        ray.init(address=address or None, log_to_driver=True, **local)
    except ConnectionError as exc:  # 'auto' with no cluster running, a head that went away
        raise ValueError(f"{source}={target!r}: could not connect to Ray: {str(exc).splitlines()[0]}") from None
    return True


def check_cluster(config: Config, topology) -> None:
    """What the connected cluster must offer before the run directory is touched: a CPU (and with
    ``parallel.device=cuda`` a GPU) per worker, and, on a joined cluster, a node with memory for one worker."""
    import ray

    from raymoe.runtime.worker_group import check_resources
    from raymoe.train.preflight import estimate_memory

    check_resources(topology, device=config.parallel.device, num_cpus_per_worker=config.parallel.cpus_per_worker,
                    cluster=ray.cluster_resources())
    nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    need = estimate_memory(config, engine="ray").per_worker_bytes
    if nodes and need > max(nodes):
        raise ValueError(f"the model does not fit: each worker needs at least {need / 2**30:,.3g} GiB (planner "
                         f"estimate), the largest Ray node offers {max(nodes) / 2**30:,.3g} GiB of memory")


def train_ray(
    config: Config, *, out_dir: str | None = None, progress: bool = True, resume: str | Path | None = None,
    reshard: bool = False, overwrite: bool = False,
) -> list[dict]:
    """Train ``config`` on Ray actors; with ``resume`` (a checkpoint directory) continue that run to run.steps,
    with ``reshard`` also when it was saved in another layout (or by the single-process trainer).
    ``overwrite``: a fresh run may start in a directory holding an earlier run (which is set aside, kept).

    Nothing is written before everything that can refuse the run has been checked: the config, the layout,
    the memory plan, the directories and the data (``preflight``, before Ray starts), the checkpoint to resume,
    the cluster address, and the cluster's CPUs/GPUs (``check_cluster``, right after ``ray.init``)."""
    import ray

    from raymoe.runtime.metrics import MetricsExporter
    from raymoe.train.stop import StopRequests

    out_dir = out_dir or config.run.out_dir
    validate_layout(config)  # pure: the layout is refused before anything else is looked at
    target, source = effective_address(config.run.ray_address)
    preflight(config, out_dir, engine="ray", fresh=resume is None, overwrite=overwrite,
              workers_on_this_machine=not target and not ray.is_initialized())
    check_address(target, source)
    policy = RestartFromCheckpoint(config.run.max_failures) if config.run.max_failures else FailFast()
    driver = Driver(config, failure_policy=policy)  # allocates routing state: only after the memory check
    manifest = consolidated = None
    if resume is not None:  # so is the checkpoint: readable, same model and layout, steps left to train
        manifest, _ = read_run_state(Path(resume), config, Layout.of(config),
                                     num_routers=driver.routing_bias_RE.shape[0], reshard=reshard)
        check_steps(manifest, config.run.steps, source=str(resume))
        if reshard:  # every shard read and checked (and its optimizer index) before any actor starts
            from raymoe.checkpoint.reshard import consolidate_training_state

            consolidated = consolidate_training_state(Path(resume))
    started = init_ray(config.run.ray_address)
    try:
        check_cluster(config, driver.topology)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    run_dir = RunDir(out_dir, config, resume_step=manifest.step if manifest else None, overwrite=overwrite)
    store = open_store(config, run_dir, fresh=manifest is None)
    exporter = MetricsExporter.for_run(config, run_dir.path)  # dashboard metrics + RUN_DIR/actions.jsonl
    p = config.parallel
    loop = TrainLoop(
        config, _RayEngine(driver, PeriodicEval(config), run_dir), store, run_dir,
        desc=f"train (ray {config.schedule.name} pp={p.pp}{f' ep={p.ep}' if p.ep > 1 else ''} dp={p.dp})",
        last_checkpoint=Path(resume) if resume else None, on_step=exporter.record, on_save=exporter.checkpoint,
        recovery=_Recovery(driver, policy, exporter),
    )
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


class _RayEngine:
    """The driver as the loop's ``StepEngine``: a step of the workers, with the run's periodic evaluation."""

    def __init__(self, driver: Driver, evals: PeriodicEval, run_dir: RunDir) -> None:
        self.driver, self.evals, self.run_dir = driver, evals, run_dir

    @property
    def step_index(self) -> int:
        return self.driver.step_index

    def run_step(self):
        report = self.driver.step()
        report.record.update(self.evals.after_ray_step(self.driver, self.run_dir.path))
        return report.record, report.results

    def save(self, store) -> Path:
        return self.driver.save_checkpoint(store)


class _Recovery:
    """A worker failure the failure policy retries: new workers from this run's last checkpoint, the run
    directory rewound to it, an event and a dashboard counter."""

    def __init__(self, driver: Driver, policy, exporter) -> None:
        self.driver, self.policy, self.exporter = driver, policy, exporter

    def applies(self, error: Exception) -> bool:
        return self.driver.state is DriverState.RECOVERING

    def recover(self, error: Exception, loop: TrainLoop) -> None:
        failed_at = self.driver.step_index
        source = loop.last_checkpoint
        loop.bar.write(f"worker failure at step {failed_at} ({type(error).__name__}: {str(error)[:200]}); "
                       f"restarting the workers from {source or 'the start'} "
                       f"(failure {self.policy.failures} of {self.policy.max_failures})")
        start = time.perf_counter()
        self.driver.recover(source)
        self.exporter.recovery()
        loop.run_dir.rewind(self.driver.step_index)
        loop.run_dir.event("recovered", failed_at_step=failed_at, resumed_at_step=self.driver.step_index,
                           checkpoint=str(source) if source else None, error=f"{type(error).__name__}: {error}",
                           seconds=time.perf_counter() - start)
        loop.bar.n = self.driver.step_index
        loop.bar.refresh()
