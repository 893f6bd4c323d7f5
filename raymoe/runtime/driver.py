"""The driver: validates a layout, starts the workers, and runs training steps as an explicit state machine.

    INITIALIZING --start()--> RUNNING --finish()--> FINISHED
         |                     |   ^
         |                     |   +-- CHECKPOINTING (save_checkpoint) / RECOVERING (recover: new workers)
         +------ error --------+--> ERRORED   (or RECOVERING, if the failure policy says so)

Everything that can be checked without a cluster is checked in the constructor (``validate_layout``), and the
cluster's capacity before any actor starts (``WorkerGroup.start``), so a bad layout fails in seconds with the
offending values named.

One step: the driver reads the global batch, splits it into dp shards (contiguous rows, as the data loader's
dp split) and micro-batches, and makes one ``run_step`` call per worker carrying the micro-batches its first/last
stages need, the routing state and the learning rate. The tokens go inline: a ``ray.put`` per micro-batch plus
the worker's ``ray.get`` cost ~10 ms a step for eight 129-token rows, as arguments ~1.5 ms; Ray moves arguments
over 100 KiB through the object store by itself. It then sums the workers' per-expert counts into the global
load, applies the bias rule (``raymoe.routing.update_bias``; routing policy lives here, in one place) and writes
the same per-step record as the single-process trainer.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from raymoe.checkpoint import Layout, Manifest
from raymoe.config import Config
from raymoe.data import check_vocab_fits
from raymoe.model import router_slots
from raymoe.parallel.dispatcher import contiguous_placement
from raymoe.parallel.stage_plan import StagePlan, plan_stages
from raymoe.parallel.topology import Topology
from raymoe.runtime.driver_checkpoints import DriverCheckpoints
from raymoe.runtime.driver_state import TRANSITIONS, DriverState, Transition
from raymoe.runtime.results import LoadInfo, StepInputs, StepResult
from raymoe.runtime.worker import Worker
from raymoe.runtime.worker_group import WorkerGroup
from raymoe.schedule import Schedule, build_schedule
from raymoe.schedule.layout_rules import check_zero_stage
from raymoe.train.metrics import StepMetrics, load_statistics
from raymoe.train.progress import RunProgress, TracksProgress


class FailurePolicy(Protocol):
    def decide(self, error: BaseException, state: DriverState) -> DriverState:
        """The state to enter after ``error`` in ``state``: ERRORED, or RECOVERING to retry."""
        ...


class FailFast:
    """Any failure ends the run (``run.max_failures=0``)."""

    def decide(self, error: BaseException, state: DriverState) -> DriverState:
        return DriverState.ERRORED


class RestartFromCheckpoint:
    """Up to ``max_failures`` times, a failed step or save sends the driver to RECOVERING: its owner then calls
    ``Driver.recover`` (new workers, the last checkpoint). Errors that another attempt cannot fix end the run:
    a ``ValueError`` (bad input, refused layout, corrupt checkpoint, also when raised inside a worker), a
    ``KeyboardInterrupt``, or a failure outside RUNNING / CHECKPOINTING (a recovery that itself fails)."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures = 0

    def decide(self, error: BaseException, state: DriverState) -> DriverState:
        fatal = isinstance(error, ValueError) or not isinstance(error, Exception)
        retryable_state = state in (DriverState.RUNNING, DriverState.CHECKPOINTING)
        if fatal or not retryable_state or self.failures >= self.max_failures:
            return DriverState.ERRORED
        self.failures += 1
        return DriverState.RECOVERING


def validate_layout(config: Config) -> tuple[Schedule, StagePlan]:
    """Everything about a layout that can be refused without a cluster; ValueError names the values."""
    p = config.parallel
    check_zero_stage(zero_stage=p.zero_stage, schedule=config.schedule.name, pp=p.pp, ep=p.ep,
                     mtp_depth=config.mtp.depth)
    schedule = build_schedule(config.schedule.name, p.pp, config.schedule.num_microbatches)
    plan = plan_stages(config.model.num_layers, schedule.placement.num_chunks, p.stage_layers)
    return schedule, plan


@dataclass
class StepReport:
    record: dict
    """The per-step metrics record (``metrics.jsonl``)."""
    results: list[StepResult]
    wall_s: float
    """Driver-side wall time of the step: batch preparation, the Ray round trip, aggregation."""


class Driver(DriverCheckpoints, TracksProgress):
    def __init__(
        self,
        config: Config,
        *,
        worker_group: WorkerGroup | None = None,
        failure_policy: FailurePolicy | None = None,
        batches=None,
        timeout_s: float = 300.0,
    ) -> None:
        self.config = config
        self.schedule, self.plan = validate_layout(config)
        check_vocab_fits(config.data.path, config.model.vocab_size)  # the data's tokenizer, before any worker
        p = config.parallel
        self.topology = Topology(pp=p.pp, ep=p.ep, dp=p.dp)
        if worker_group is not None and worker_group.topology != self.topology:
            raise ValueError(f"worker group topology {worker_group.topology} != the config's {self.topology}")
        self.worker_group = worker_group
        self._owns_group = worker_group is None
        self.failure_policy = failure_policy or FailFast()
        self.timeout_s = timeout_s
        self._batches = batches
        self._given_batches = batches is not None
        self.key = f"{config.schedule.name}-{uuid.uuid4().hex[:8]}"
        self.state = DriverState.INITIALIZING
        self.history: list[Transition] = [Transition(DriverState.INITIALIZING, time.time())]
        num_routers = len(router_slots(config.model, config.mtp.depth))
        self.progress = RunProgress(routing_bias_RE=torch.zeros(num_routers, config.model.num_routed_experts))
        if config.run.init_from:  # checked before any worker starts; the biases come with the weights
            from raymoe.checkpoint.export import BIAS, check_export, read_tensors

            check_export(config.run.init_from, config)
            self.routing_bias_RE = read_tensors(config.run.init_from, [BIAS])[BIAS].float()
        self._initial_bias_RE = self.routing_bias_RE.clone()
        # Expert placement is routing state too: owned here, sent to the workers, saved in checkpoints.
        self.expert_placement = contiguous_placement(config.model.num_routed_experts, p.ep)
        self.load_info: list[LoadInfo] = []
        self._needed = self._microbatches_per_pipeline_rank()

    # -- state machine -------------------------------------------------------------------------------------------
    def _transition(self, new: DriverState, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"driver cannot go from {self.state.value} to {new.value}")
        self.state = new
        self.history.append(Transition(new, time.time(), reason))

    @contextlib.contextmanager
    def _guard(self):
        """A failure inside goes to the failure policy (ERRORED, or RECOVERING), then on to the caller."""
        try:
            yield
        except BaseException as exc:
            self._fail(exc)
            raise

    def _fail(self, error: BaseException) -> None:
        decided = self.failure_policy.decide(error, self.state)
        if decided not in TRANSITIONS[self.state]:  # e.g. nothing to recover before the workers ever ran
            decided = DriverState.ERRORED
        self._transition(decided, f"{type(error).__name__}: {error}")
        if decided is DriverState.ERRORED:
            self.close()

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> Driver:
        """Reserve resources, start and bootstrap the workers (unless given), load the layout on them."""
        if self.state is not DriverState.INITIALIZING:
            raise RuntimeError(f"start() in state {self.state.value}")
        with self._guard():
            self._start_workers()
        self._transition(DriverState.RUNNING)
        return self

    def _start_workers(self) -> None:
        if self.worker_group is None:
            self.worker_group = WorkerGroup(
                self.topology, device=self.config.parallel.device, timeout_s=self.timeout_s,
                num_cpus_per_worker=self.config.parallel.cpus_per_worker,
            ).start()
        placement = self.schedule.placement
        # which Ray node each worker is on: the dispatcher splits its all-to-all bytes into same- / cross-node
        nodes = self.worker_group.execute(Worker.node_id) if self.topology.ep > 1 else [""] * self.topology.world_size
        self.node_of_rank = tuple(sorted(set(nodes)).index(n) for n in nodes)
        args = [
            (self.key, self.config, placement, self.schedule.actions[self.topology.coord(r).pp_rank],
             self.expert_placement, self.node_of_rank)
            for r in range(self.topology.world_size)
        ]
        self.load_info = self.worker_group.execute_each(Worker.load, args)

    def recover(self, checkpoint: Path | None) -> None:
        """RECOVERING -> RUNNING: stop every worker (the dead and the stuck alike), start a new group, and go back to
        ``checkpoint`` (or to the start of the run, when there is none yet)."""
        if self.state is not DriverState.RECOVERING:
            raise RuntimeError(f"recover() in state {self.state.value}")
        if not self._owns_group:
            raise RuntimeError("recover() needs a driver that started its own workers")
        with self._guard():
            old, self.worker_group = self.worker_group, None
            if old is not None:
                old.shutdown()
            self._start_workers()
        self.step_index, self.tokens_seen = 0, 0
        self.routing_bias_RE = self._initial_bias_RE.clone()
        if not self._given_batches:
            self._batches = None  # reopened at the start of the data, or at the checkpoint's cursor
        self._transition(DriverState.RUNNING, f"recovered from {checkpoint or 'the start'}")
        if checkpoint is not None:  # the checkpoint a resharded run started from is another layout's
            self.restore(checkpoint, reshard=Manifest.read(checkpoint).layout != Layout.of(self.config))

    def finish(self) -> None:
        if self.state is DriverState.RUNNING:
            self._transition(DriverState.FINISHED)
        self.close()

    def close(self) -> None:
        """Unload the layout; stop the workers if this driver started them."""
        group, self.worker_group = self.worker_group, None
        if group is None:
            return
        if self._owns_group:
            group.shutdown()
        else:
            try:  # bounded: a worker stuck in a collective would hold the call until the gloo timeout
                group.execute(Worker.unload, self.key, timeout_s=30)
            except Exception:  # the group's owner decides what to do with broken workers
                pass

    # -- steps ---------------------------------------------------------------------------------------------------
    @property
    def batches(self):
        if self._batches is None:
            from raymoe.train.batches import open_batches

            self._batches = open_batches(self.config)
        return self._batches

    def run(self, steps: int | None = None, on_step: Callable[[StepReport], None] | None = None) -> list[dict]:
        records = []
        for _ in range(self.config.run.steps if steps is None else steps):
            report = self.step()
            records.append(report.record)
            if on_step is not None:
                on_step(report)
        return records

    def step(self, tokens_BL: torch.Tensor | None = None, *, capture: bool = False) -> StepReport:
        """One optimizer step on ``tokens_BL`` (the global batch) or the next batch of the data."""
        if self.state is not DriverState.RUNNING:
            raise RuntimeError(f"step() in state {self.state.value}; call start() first")
        cfg = self.config
        if tokens_BL is None:
            tokens_BL = self.batches.next_batch()
        if tokens_BL.shape[0] != cfg.data.batch_size:
            raise ValueError(f"global batch has {tokens_BL.shape[0]} rows, data.batch_size is {cfg.data.batch_size}")
        start = time.perf_counter()
        knobs = self.progress.knobs(cfg)
        with self._guard():
            results = self._run_workers(tokens_BL, lr=knobs.lr, mtp_weight=knobs.mtp_weight, capture=capture)
        counts_RE = sum(r.counts_RE for r in results)
        step, num_tokens = self.progress.advance(cfg, tokens_BL, counts_RE, knobs)
        wall = time.perf_counter() - start
        record = self._record(results, counts_RE, step=step, lr=knobs.lr, mtp_weight=knobs.mtp_weight,
                              gamma=knobs.gamma, wall=wall, num_tokens=num_tokens)
        return StepReport(record=record, results=results, wall_s=wall)

    def _microbatches_per_pipeline_rank(self) -> dict[int, list[int]]:
        """Micro-batches whose tokens each pipeline rank reads: inputs of its first stages, labels of its last."""
        placement, m = self.schedule.placement, self.config.schedule.num_microbatches
        needed: dict[int, set[int]] = {r: set() for r in range(self.topology.pp)}
        for info in placement.stages:
            if info.is_first or info.is_last:
                needed[info.rank].update(placement.microbatches_of(info.stage, m))
        return {r: sorted(ms) for r, ms in needed.items()}

    def _run_workers(self, tokens_BL: torch.Tensor, *, lr: float, mtp_weight: float, capture: bool):
        topo, m = self.topology, self.config.schedule.num_microbatches
        micro = {}
        for d, shard in enumerate(tokens_BL.chunk(topo.dp)):
            for i, rows in enumerate(shard.chunk(m)):
                micro[d, i] = rows.contiguous()
        args = []
        for rank in range(topo.world_size):
            c = topo.coord(rank)
            inputs = StepInputs(
                step=self.step_index, microbatches={i: micro[c.dp_rank, i] for i in self._needed[c.pp_rank]},
                bias_RE=self.routing_bias_RE, lr=lr, mtp_weight=mtp_weight, capture=capture,
            )
            args.append((self.key, inputs))
        # A worker stuck outside a collective (which the process-group timeout would end) hangs the step: the
        # step timeout turns that into a TimeoutError, which the failure policy may recover from.
        return self.worker_group.execute_each(Worker.run_step, args, timeout_s=self.config.run.step_timeout_s or None)

    def _record(self, results: list[StepResult], counts_RE, *, step, lr, mtp_weight, gamma, wall, num_tokens) -> dict:
        dp = self.topology.dp
        main = sum(r.main_ce for r in results) / dp
        mtp = sum(r.mtp_ce for r in results) / dp
        balance = sum(r.balance for r in results) / dp
        max_vio, per_layer = load_statistics(counts_RE)
        worker_s = max(r.step_s for r in results)
        return StepMetrics(
            step=step, loss=main, mtp_loss=mtp, balance_loss=balance,
            total_loss=main + mtp_weight * mtp + balance, max_vio=max_vio, lr=lr, grad_norm=results[0].grad_norm,
            tokens=num_tokens, tokens_per_s=num_tokens / wall, step_time_s=wall, mtp_weight=mtp_weight,
            bias_gamma=gamma, max_vio_per_layer=per_layer, expert_load=counts_RE.tolist(),
            extra={
                "engine": "ray",
                "schedule": self.config.schedule.name,
                "pp": self.topology.pp,
                "dp": dp,
                "worker_step_s": worker_s,
                "driver_overhead_s": wall - worker_s,
                "compute_s_per_rank": [r.compute_s for r in results],
                "optimizer_s_max": max(r.optimizer_s for r in results),
                "optimizer_state_bytes_per_rank": [r.optimizer_state_bytes for r in results],
                "peak_live_activations_per_rank": [r.peak_live_activations for r in results],
                **(dispatch_metrics(results, self.topology) if self.topology.ep > 1 else {}),
            },
        ).to_dict()


def dispatch_metrics(results: list[StepResult], topology: Topology) -> dict:
    """The step's expert all-to-all, summed over workers: bytes sent (naive one-copy-per-expert, deduplicated,
    measured same-node / cross-node), the slowest rank's seconds in it (issue to result) and waiting for it
    (exposed: all of it unless ``schedule.overlap_a2a`` hid some), and the rows each ep rank received."""
    total = {k: sum(r.dispatch.get(k, 0) for r in results) for k in
             ("naive_bytes", "dedup_bytes", "measured_same_node_bytes", "measured_cross_node_bytes")}
    received = [r.dispatch.get("rows_received", 0) for r in results]
    mean = sum(received) / len(received)
    return {
        "a2a_naive_bytes": total["naive_bytes"],
        "a2a_dedup_bytes": total["dedup_bytes"],
        "a2a_measured_same_node_bytes": total["measured_same_node_bytes"],
        "a2a_measured_cross_node_bytes": total["measured_cross_node_bytes"],
        "a2a_seconds_max": max(r.dispatch.get("seconds", 0.0) for r in results),
        "a2a_exposed_seconds_max": max(r.dispatch.get("exposed_seconds", 0.0) for r in results),
        "a2a_rows_received_max": max(received),
        "a2a_rows_received_mean": mean,
        "a2a_peak_rows_received": max(r.dispatch.get("peak_rows_received", 0) for r in results),
        "ep": topology.ep,
    }

