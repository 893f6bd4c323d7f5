"""The driver: validates a layout, starts the workers, and runs training steps as an explicit state machine.

    INITIALIZING --start()--> RUNNING --finish()--> FINISHED
         |                     |   ^
         |                     |   +-- CHECKPOINTING (save_checkpoint) / RECOVERING (recover: new workers)
         +------ error --------+--> ERRORED   (or RECOVERING, if the failure policy says so)

Everything that can be checked without a cluster is checked in the constructor (``validate_layout``), and the
cluster's capacity before any actor starts (``WorkerGroup.start``), so a bad layout fails in seconds with the
offending values named.

One step: the driver reads the global batch, splits it into dp shards (contiguous rows, as the data loader's
dp split) and micro-batches, puts each micro-batch into the object store once, and makes one ``run_step`` call
per worker with the refs its first/last stages need, the routing state and the learning rate. It then sums the
workers' per-expert counts into the global load, applies the bias rule (``raymoe.routing.update_bias``; routing
policy lives here, in one place) and writes the same per-step record as the single-process trainer.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from raymoe.checkpoint import CheckpointStore, Layout, Manifest
from raymoe.checkpoint.run_state import RunState, build_manifest, read_run_state
from raymoe.config import Config
from raymoe.data import check_vocab_fits
from raymoe.model import router_slots
from raymoe.parallel.stage_plan import StagePlan, plan_stages
from raymoe.parallel.topology import Topology
from raymoe.routing import update_bias
from raymoe.runtime.results import LoadInfo, StepInputs, StepResult
from raymoe.runtime.worker_group import WorkerGroup
from raymoe.schedule import Schedule, build_schedule
from raymoe.train.metrics import StepMetrics, load_statistics
from raymoe.train.optim import lr_at


class DriverState(enum.Enum):
    INITIALIZING = "initializing"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    RECOVERING = "recovering"
    FINISHED = "finished"
    ERRORED = "errored"


TRANSITIONS: dict[DriverState, frozenset[DriverState]] = {
    DriverState.INITIALIZING: frozenset({DriverState.RUNNING, DriverState.ERRORED}),
    DriverState.RUNNING: frozenset(
        {DriverState.CHECKPOINTING, DriverState.RECOVERING, DriverState.FINISHED, DriverState.ERRORED}
    ),
    DriverState.CHECKPOINTING: frozenset({DriverState.RUNNING, DriverState.RECOVERING, DriverState.ERRORED}),
    DriverState.RECOVERING: frozenset({DriverState.RUNNING, DriverState.ERRORED}),
    DriverState.FINISHED: frozenset(),
    DriverState.ERRORED: frozenset(),
}


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
    if p.ep != 1:
        raise ValueError(
            f"parallel.ep={p.ep}: expert parallelism is not available in this runtime yet; use parallel.ep=1 "
            f"(experts are then replicated like dense layers, data-parallel over parallel.dp={p.dp})"
        )
    schedule = build_schedule(config.schedule.name, p.pp, config.schedule.num_microbatches)
    if p.zero_stage == 2 and p.pp > 1:
        _check_zero2_with_pipeline(config, schedule.placement.family)
    plan = plan_stages(config.model.num_layers, schedule.placement.num_chunks, p.stage_layers)
    return schedule, plan


def _check_zero2_with_pipeline(config: Config, family: str) -> None:
    """ZeRO-2 reduces and frees each backward pass's gradients at once; parameters copied on two pipeline ranks
    (``raymoe.parallel.stage_plan.grad_sync_plan``) are summed after the last backward, too late for it."""
    p, name = config.parallel, config.schedule.name
    if family == "dualpipe":
        raise ValueError(
            f"parallel.zero_stage=2 with schedule.name={name}, parallel.pp={p.pp}: DualPipe keeps two copies of "
            f"every stage whose gradients are summed after the last backward, when ZeRO-2 has already reduced and "
            f"freed them; use schedule.name=dualpipev (one copy) or parallel.zero_stage=1"
        )
    if family == "one-per-rank" and config.mtp.depth > 0:
        raise ValueError(
            f"parallel.zero_stage=2 with schedule.name={name}, parallel.pp={p.pp}, mtp.depth={config.mtp.depth}: the "
            f"MTP modules on the last stage use a copy of the first stage's embedding, whose gradients are summed "
            f"after the last backward, when ZeRO-2 has already reduced and freed them; use schedule.name=dualpipev "
            f"(first and last stage on one rank), parallel.pp=1, mtp.depth=0 or parallel.zero_stage=1"
        )


@dataclass
class StepReport:
    record: dict
    """The per-step metrics record (``metrics.jsonl``)."""
    results: list[StepResult]
    wall_s: float
    """Driver-side wall time of the step: batch preparation, the Ray round trip, aggregation."""


@dataclass
class _Transition:
    state: DriverState
    at: float
    reason: str = ""


class Driver:
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
        self.history: list[_Transition] = [_Transition(DriverState.INITIALIZING, time.time())]
        self.step_index = 0
        self.tokens_seen = 0
        num_routers = len(router_slots(config.model, config.mtp.depth))
        self.routing_bias_RE = torch.zeros(num_routers, config.model.num_routed_experts)
        if config.run.init_from:  # checked before any worker starts; the biases come with the weights
            from raymoe.checkpoint.export import BIAS, check_export, read_tensors

            check_export(config.run.init_from, config)
            self.routing_bias_RE = read_tensors(config.run.init_from, [BIAS])[BIAS].float()
        self._initial_bias_RE = self.routing_bias_RE.clone()
        self.load_info: list[LoadInfo] = []
        self._needed = self._microbatches_per_pipeline_rank()

    # -- state machine -------------------------------------------------------------------------------------------
    def _transition(self, new: DriverState, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"driver cannot go from {self.state.value} to {new.value}")
        self.state = new
        self.history.append(_Transition(new, time.time(), reason))

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
        try:
            self._start_workers()
        except BaseException as exc:
            self._fail(exc)
            raise
        self._transition(DriverState.RUNNING)
        return self

    def _start_workers(self) -> None:
        if self.worker_group is None:
            self.worker_group = WorkerGroup(
                self.topology, device=self.config.parallel.device, timeout_s=self.timeout_s
            ).start()
        placement = self.schedule.placement
        args = [
            (self.key, self.config, placement, self.schedule.actions[self.topology.coord(r).pp_rank])
            for r in range(self.topology.world_size)
        ]
        self.load_info = self.worker_group.execute_each("load", args)

    def recover(self, checkpoint: Path | None) -> None:
        """RECOVERING -> RUNNING: stop every worker (the dead and the stuck alike), start a new group, and go back to
        ``checkpoint`` (or to the start of the run, when there is none yet)."""
        if self.state is not DriverState.RECOVERING:
            raise RuntimeError(f"recover() in state {self.state.value}")
        if not self._owns_group:
            raise RuntimeError("recover() needs a driver that started its own workers")
        try:
            old, self.worker_group = self.worker_group, None
            if old is not None:
                old.shutdown()
            self._start_workers()
        except BaseException as exc:
            self._fail(exc)
            raise
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
                group.execute("unload", self.key, timeout_s=30)
            except Exception:  # the group's owner decides what to do with broken workers
                pass

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, store: CheckpointStore) -> Path:
        """RUNNING -> CHECKPOINTING -> RUNNING: every worker writes its shard, then the manifest commits them."""
        if self.state is not DriverState.RUNNING:
            raise RuntimeError(f"save_checkpoint() in state {self.state.value}")
        self._transition(DriverState.CHECKPOINTING, f"step {self.step_index}")
        try:
            staging = store.begin(self.step_index)
            entries = self.worker_group.execute("save_checkpoint_shard", self.key, str(staging))
            state = RunState(step=self.step_index, tokens_seen=self.tokens_seen,
                             cursor=self.batches.cursor.to_dict(), bias_RE=self.routing_bias_RE)
            manifest = build_manifest(self.config, state, Layout.of(self.config), entries)
            path = store.commit(staging, manifest)
        except BaseException as exc:
            self._fail(exc)
            raise
        self._transition(DriverState.RUNNING, f"saved {path}")
        return path

    def check_checkpoint_storage(self, store: CheckpointStore) -> None:
        """Every worker writes its shard into ``store.root``: refuse a directory some workers cannot see (node-local
        storage on a multi-node cluster) now, instead of at the first save hours later."""
        import socket

        store.root.mkdir(parents=True, exist_ok=True)
        probe = store.root / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_text(socket.gethostname())
        try:
            seen = self.worker_group.execute("sees_file", str(probe))
        finally:
            probe.unlink(missing_ok=True)
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        if blind:
            raise ValueError(
                f"run.checkpoint_dir {str(store.root)!r} is not visible to workers {blind}: on a multi-node cluster "
                f"checkpoints need storage every node mounts (set run.checkpoint_dir to such a path)"
            )

    def restore(self, checkpoint: Path, *, reshard: bool = False, consolidated=None) -> Manifest:
        """Load a checkpoint into the started workers and this driver; returns its manifest. Without ``reshard``
        the checkpoint must be this layout's (each worker loads its own shard); with it, any layout's: the driver
        assembles full per-parameter weights and AdamW states (``consolidated``, if already read:
        ``raymoe.checkpoint.reshard.consolidate_training_state``) and every worker takes its own parameters'."""
        from raymoe.data import Cursor
        from raymoe.train.batches import open_batches

        if self.state is not DriverState.RUNNING or self.step_index:
            raise RuntimeError(f"restore() needs a freshly started driver (state {self.state.value}, "
                               f"step {self.step_index})")
        manifest, state = read_run_state(checkpoint, self.config, Layout.of(self.config),
                                         num_routers=self.routing_bias_RE.shape[0], reshard=reshard)
        try:
            if reshard:
                self._load_resharded(checkpoint, consolidated)
            else:
                shards = sorted(manifest.shards, key=lambda e: e.rank)
                self.worker_group.execute_each(
                    "load_checkpoint_shard", [(self.key, str(checkpoint), e.file, e.sha256) for e in shards]
                )
        except BaseException as exc:
            self._fail(exc)
            raise
        self.step_index, self.tokens_seen, self.routing_bias_RE = state.step, state.tokens_seen, state.bias_RE
        self._batches = open_batches(self.config, cursor=Cursor.from_dict(state.cursor))
        self.history.append(_Transition(self.state, time.time(), f"restored {checkpoint}"
                                        + (" (resharded)" if reshard else "")))
        return manifest

    def _load_resharded(self, checkpoint: Path, consolidated) -> None:
        import ray

        from raymoe.checkpoint.reshard import consolidate_training_state

        if consolidated is None:
            consolidated = consolidate_training_state(checkpoint)
        # One copy in the object store; each worker deserializes it and keeps only its own parameters' part.
        ref = ray.put({"weights": consolidated.weights, "states": consolidated.states})
        try:
            self.worker_group.execute("load_resharded", self.key, ref)
        finally:
            del ref

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
        mtp_weight = cfg.mtp.weight_at(self.tokens_seen)
        gamma = cfg.routing.gamma_at(self.tokens_seen)
        lr = lr_at(self.step_index, cfg.optim, cfg.run.steps)
        try:
            results = self._run_workers(tokens_BL, lr=lr, mtp_weight=mtp_weight, capture=capture)
        except BaseException as exc:
            self._fail(exc)
            raise
        counts_RE = sum(r.counts_RE for r in results)
        self.routing_bias_RE = update_bias(self.routing_bias_RE, counts_RE, gamma)
        wall = time.perf_counter() - start
        num_tokens = tokens_BL.shape[0] * (tokens_BL.shape[1] - 1 - cfg.mtp.depth)
        self.tokens_seen += num_tokens
        record = self._record(results, counts_RE, lr=lr, mtp_weight=mtp_weight, gamma=gamma, wall=wall,
                              num_tokens=num_tokens)
        self.step_index += 1
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
        import ray

        topo, m = self.topology, self.config.schedule.num_microbatches
        refs = {}
        for d, shard in enumerate(tokens_BL.chunk(topo.dp)):
            for i, micro in enumerate(shard.chunk(m)):
                refs[d, i] = ray.put(micro.contiguous())
        args = []
        for rank in range(topo.world_size):
            c = topo.coord(rank)
            inputs = StepInputs(
                step=self.step_index, microbatches={i: refs[c.dp_rank, i] for i in self._needed[c.pp_rank]},
                bias_RE=self.routing_bias_RE, lr=lr, mtp_weight=mtp_weight, capture=capture,
            )
            args.append((self.key, inputs))
        # A worker stuck outside a collective (which the process-group timeout would end) hangs the step: the
        # step timeout turns that into a TimeoutError, which the failure policy may recover from.
        return self.worker_group.execute_each("run_step", args, timeout_s=self.config.run.step_timeout_s or None)

    def _record(self, results: list[StepResult], counts_RE, *, lr, mtp_weight, gamma, wall, num_tokens) -> dict:
        dp = self.topology.dp
        main = sum(r.main_ce for r in results) / dp
        mtp = sum(r.mtp_ce for r in results) / dp
        balance = sum(r.balance for r in results) / dp
        max_vio, per_layer = load_statistics(counts_RE)
        worker_s = max(r.step_s for r in results)
        return StepMetrics(
            step=self.step_index, loss=main, mtp_loss=mtp, balance_loss=balance,
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
            },
        ).to_dict()

