"""The worker actor: owns one rank's pipeline stage(s), its optimizer partition and its executor.

A worker is created bare, joins torch.distributed (``bootstrap.py``), and then *loads* a layout: it builds the
full model from the run seed, keeps the chunks its pipeline rank holds (``PipelineStage``), wraps their
parameters in the ZeRO optimizer and builds the executor for its action list (shipped once, at load). Each
``run_step`` is then one Ray call carrying its micro-batches: write the routing state into
its gates, run its actions (activations and gradients go peer to peer), sum replicated gradients (tied
embedding; DualPipe's mirror copies chunk by chunk while the backward work still runs, ``grad_sync.py``), step the
optimizer, and return a ``StepResult``.

A worker may hold several loaded layouts of the same topology at once (keyed by name); the benchmark uses that
to alternate schedules step by step on the same actors.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from raymoe.config import Config
from raymoe.model import router_slots, set_gate_biases
from raymoe.model.build import compute_context
from raymoe.model.moe import is_expert_parameter
from raymoe.parallel.dispatcher import AllToAllDispatcher, DispatchStats, experts_of, install_dispatcher
from raymoe.parallel.executor import Executor
from raymoe.parallel.grad_sync import MirrorGradSync, build_mirror_lanes
from raymoe.parallel.groups import ProcessGroups, all_reduce_sum, build_process_groups, grad_or_zeros
from raymoe.parallel.p2p import TorchTransport
from raymoe.parallel.stage_plan import GradSync, PipelineStage, build_stage, grad_sync_plan, plan_stages
from raymoe.parallel.topology import Topology
from raymoe.runtime.bootstrap import worker_init_process_group, worker_open_store
from raymoe.runtime.host_memory import keep_freed_memory
from raymoe.runtime.results import LoadInfo, StepInputs, StepResult
from raymoe.schedule import Action, Placement


@dataclass
class _Layout:
    config: Config
    stage: PipelineStage
    actions: tuple[Action, ...]
    executor: Executor
    optimizer: object
    sync: GradSync
    dispatcher: AllToAllDispatcher | None = None
    mirror: MirrorGradSync | None = None


class Worker:
    def __init__(self, rank: int, topology: Topology, *, device: str = "cpu", num_threads: int = 1) -> None:
        torch.set_num_threads(num_threads)  # one core per actor; more threads only oversubscribe
        keep_freed_memory()  # the same buffers every step: do not fault them back in each time (host_memory.py)
        self.rank = rank
        self.topology = topology
        self.coord = topology.coord(rank)
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.backend = "nccl" if device == "cuda" else "gloo"
        self._store = None
        self.groups: ProcessGroups | None = None
        self.layouts: dict[str, _Layout] = {}
        self._mirror_lanes: tuple | None = None  # DualPipe's per-unit mirror groups, made at the first such load

    # -- bootstrap ---------------------------------------------------------------------------------------------
    def open_store(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        self._store, host, port = worker_open_store(world_size, timeout_s)
        return host, port

    def init_distributed(self, host: str, port: int, backend: str, timeout_s: float) -> int:
        worker_init_process_group(store=self._store, host=host, port=port, rank=self.rank,
                                  world_size=self.topology.world_size, backend=backend, timeout_s=timeout_s)
        self.backend = backend
        self.groups = build_process_groups(self.topology, self.rank)
        return self.rank

    def node_id(self) -> str:
        """The Ray node this worker runs on: ep ranks on one node exchange tokens over the fast intra-node links."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def whoami(self) -> dict:
        """Where this worker stands in Ray and in torch.distributed (for tests and debugging)."""
        import os

        import torch.distributed as dist

        return {
            "rank": self.rank,
            "coord": self.coord,
            "dist_rank": dist.get_rank() if dist.is_initialized() else None,
            "world_size": dist.get_world_size() if dist.is_initialized() else None,
            "backend": self.backend,
            "groups": dict(self.groups.members) if self.groups else {},
            "pid": os.getpid(),
        }

    # -- layouts -----------------------------------------------------------------------------------------------
    def load(self, key: str, config: Config, placement: Placement, actions: tuple[Action, ...],
             expert_placement: torch.Tensor | None = None, node_of_rank: tuple[int, ...] | None = None) -> LoadInfo:
        """Build this rank's stage(s) with its expert shard, its optimizer and executor for a layout.

        ``expert_placement`` (expert id -> ep rank, owned by the driver) says which routed experts this rank's ep
        rank holds; ``node_of_rank`` (global rank -> node index) lets the dispatcher split its traffic into
        same-node and cross-node bytes.
        """
        from raymoe.zero import build_optimizer

        p = config.parallel
        pp_rank = self.coord.pp_rank
        plan = plan_stages(config.model.num_layers, placement.num_chunks, p.stage_layers)
        num_routers = len(router_slots(config.model, config.mtp.depth))
        num_experts = config.model.num_routed_experts
        chunks = [placement.info(s).chunk for s in placement.stages_of(pp_rank)]
        expert_ids = None if p.ep == 1 else experts_of(expert_placement, self.coord.ep_rank)
        stage = build_stage(config, plan, chunks, device=self.device, expert_ids=expert_ids)
        dispatcher = None
        if p.ep > 1:
            members = self.groups.members["ep"]
            nodes = tuple(node_of_rank[r] for r in members) if node_of_rank is not None else None
            dispatcher = AllToAllDispatcher(group=self.groups.ep, backward_group=self.groups.ep_backward,
                                            rank_of_expert_E=expert_placement, node_of_rank=nodes,
                                            fp8=config.precision.fp8_dispatch,
                                            fp8_power_of_two=config.precision.fp8_power_of_two_scales)
            install_dispatcher(stage, dispatcher)
        if config.run.init_from:  # weights of an export, whatever layout wrote it: this stage reads its own
            from raymoe.checkpoint import copy_parameters
            from raymoe.checkpoint.export import read_tensors

            params = dict(stage.named_parameters())
            copy_parameters(params, read_tensors(config.run.init_from, params), source=config.run.init_from)
        sync = grad_sync_plan(placement.family, p.pp, pp_rank, stage)
        named = dict(stage.named_parameters())
        optimizer = build_optimizer(
            stage, config.optim, zero_stage=p.zero_stage, dp_group=self.groups.dp, pp_group=self.groups.pp,
            not_in_norm=[named[n] for n in sorted(sync.not_in_norm)], micro_batch_size=config.micro_batch_size,
            num_microbatches=config.schedule.num_microbatches, backend=self.backend,
            bf16_moments=config.precision.bf16_optimizer_states,
            expert_params=[named[n] for n in named if is_expert_parameter(n)] if p.ep > 1 else (),
            ep_group=self.groups.ep, edp_group=self.groups.edp,
        )
        mirror = None
        if sync.mirror:
            if self._mirror_lanes is None:  # collective: every rank loads the same layout at once
                self._mirror_lanes = build_mirror_lanes(self.topology.mirror_groups(), self.rank)
            mirror = MirrorGradSync(stage=stage, names=sync.mirror, actions=actions, placement=placement,
                                    lanes=self._mirror_lanes)
        executor = Executor(
            stage=stage, placement=placement, pipeline_rank=pp_rank,
            global_rank_of=[self.topology.pipeline_peer(self.rank, r) for r in range(p.pp)],
            transport=TorchTransport(), num_microbatches=config.schedule.num_microbatches,
            activation_shape=(config.micro_batch_size, config.data.seq_len, config.model.dim),
            # activations between stages are fp32: parameters are fp32 master weights and bf16 is autocast compute
            num_routers=num_routers, num_experts=num_experts, dtype=torch.float32,
            device=self.device, after_backward=_after_backward(optimizer, mirror),
            overlap=config.schedule.overlap_a2a,
            compute_context=lambda: compute_context(config, self.device),
        )
        self.layouts[key] = _Layout(config, stage, tuple(actions), executor, optimizer, sync, dispatcher, mirror)
        return LoadInfo(
            rank=self.rank, chunks=stage.chunks, layers=tuple(int(i) for i in stage.layers),
            num_params=sum(t.numel() for t in named.values()), param_bytes=_bytes(named.values()),
            optimizer=type(optimizer).__name__, expert_ids=tuple(expert_ids or range(num_experts)),
        )

    def unload(self, key: str) -> None:
        self.layouts.pop(key, None)

    def parameters(self, key: str) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.layouts[key].stage.named_parameters()}

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint_shard(self, key: str, directory: str) -> dict:
        """Write this rank's shard (stage parameters, optimizer partition, RNG) into the staging ``directory``."""
        from raymoe.checkpoint import save_shard

        layout = self.layouts[key]
        entry = save_shard(Path(directory), self.rank, model=dict(layout.stage.named_parameters()),
                           optimizer=layout.optimizer.state_dict())
        experts = sorted({int(e) for moe in layout.stage.moe_layers() for e in moe.experts})
        held = [] if layout.config.parallel.ep == 1 else experts
        return {"rank": self.rank, "pp_rank": self.coord.pp_rank, "dp_rank": self.coord.dp_rank, **entry,
                "expert_ids": held}

    def sees_file(self, path: str) -> bool:
        """Whether a file the driver just wrote is visible here (is the checkpoint directory shared storage?)."""
        return Path(path).is_file()

    def load_checkpoint_shard(self, key: str, directory: str, file: str, sha256: str) -> None:
        """Check and load this rank's shard into the loaded layout ``key`` (parameters, optimizer, RNG)."""
        from raymoe.checkpoint import copy_parameters, load_shard, set_rng_state

        layout = self.layouts[key]
        path = Path(directory) / file
        payload = load_shard(path, rank=self.rank, sha256=sha256)
        copy_parameters(dict(layout.stage.named_parameters()), payload["model"], source=str(path))
        layout.optimizer.load_state_dict(payload["optimizer"])
        set_rng_state(payload["rng"])

    def load_resharded(self, key: str, state: dict) -> None:
        """Take this rank's parameters and their AdamW states out of a checkpoint consolidated by the driver
        (``raymoe.checkpoint.reshard``: full tensors by name, whatever layout saved them)."""
        from raymoe.checkpoint import copy_parameters

        layout = self.layouts[key]
        params = dict(layout.stage.named_parameters())
        copy_parameters(params, {n: state["weights"][n] for n in params}, source="resharded checkpoint")
        layout.optimizer.load_param_states({n: state["states"][n] for n in params if n in state["states"]})

    # -- one step ----------------------------------------------------------------------------------------------
    def run_step(self, key: str, inputs: StepInputs) -> StepResult:
        start = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        layout = self.layouts[key]
        set_gate_biases(layout.stage.gates(), inputs.bias_RE)
        if layout.dispatcher is not None:
            layout.dispatcher.stats.reset()
            layout.dispatcher.take_exchange_log()  # drop what an aborted step may have left
        tokens = {m: t.to(self.device) for m, t in sorted(inputs.microbatches.items())}
        if layout.mirror is not None:
            layout.mirror.begin_step()
        with compute_context(layout.config, self.device):
            outcome = layout.executor.run(layout.actions, tokens, inputs.mtp_weight)

        opt_start = time.perf_counter()
        named = dict(layout.stage.named_parameters())
        self._sum_replicas(named, layout)
        sync_end = time.perf_counter()
        captured = self._capture(named, layout.optimizer) if inputs.capture else {}
        grad_norm = layout.optimizer.step(inputs.lr)
        if inputs.capture:
            captured["params_after"] = {n: t.detach().cpu().clone() for n, t in named.items()}
        end = time.perf_counter()

        memory = layout.optimizer.memory()
        return StepResult(
            rank=self.rank, pp_rank=self.coord.pp_rank, dp_rank=self.coord.dp_rank, step=inputs.step,
            main_ce=outcome.main_ce, mtp_ce=outcome.mtp_ce, balance=outcome.balance,
            num_loss_microbatches=outcome.num_loss_microbatches, counts_RE=outcome.counts_RE, grad_norm=grad_norm,
            timings=tuple(outcome.timings), timings_origin_s=outcome.origin_s, step_s=end - start,
            compute_s=sum(t.end_s - t.start_s for t in outcome.timings), optimizer_s=end - opt_start,
            replica_sync_s=sync_end - opt_start,
            recv_wait_s=outcome.recv_wait_s, send_wait_s=outcome.send_wait_s,
            peak_live_activations=outcome.peak_live_activations, param_bytes=_bytes(named.values()),
            optimizer_state_bytes=memory.state_bytes, optimizer_master_bytes=memory.master_bytes,
            optimizer_grad_bytes=memory.grad_bytes, peak_memory_bytes=self._peak_memory(),
            cpu=_cpu_used(usage, resource.getrusage(resource.RUSAGE_SELF)),
            dispatch=(layout.dispatcher.stats if layout.dispatcher is not None else DispatchStats()).as_dict(),
            phases=tuple(outcome.phases), exchanges=self._exchanges(layout, outcome.origin_s),
            **captured,
        )

    @staticmethod
    def _exchanges(layout: _Layout, origin_s: float) -> tuple:
        """This step's all-to-alls on the executor's clock (seconds since the step began)."""
        if layout.dispatcher is None:
            return ()
        return tuple(replace(e, issued_s=e.issued_s - origin_s, wait_s=e.wait_s - origin_s,
                             done_s=e.done_s - origin_s) for e in layout.dispatcher.take_exchange_log())

    def _sum_replicas(self, named: dict[str, torch.nn.Parameter], layout: _Layout) -> None:
        """Tied embedding and DualPipe mirror copies: sum their gradients so every copy takes the same step. The
        mirror sums were started during the backward work (``MirrorGradSync``); here they are waited for."""
        if layout.sync.embedding:
            all_reduce_sum([grad_or_zeros(named[n]) for n in sorted(layout.sync.embedding)], self.groups.embedding)
        if layout.mirror is not None:
            layout.mirror.finish()

    def _capture(self, named: dict[str, torch.nn.Parameter], optimizer) -> dict:
        """dp-averaged gradients (before clipping) and parameters before the update, for parity checks."""
        grads = optimizer.mean_gradients(list(named.values()))
        return {
            "grads": {n: g.cpu() for n, g in zip(named, grads)},
            "params_before": {n: t.detach().cpu().clone() for n, t in named.items()},
        }

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

    def shutdown(self) -> None:
        import torch.distributed as dist

        self.layouts.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


def _after_backward(optimizer, mirror: MirrorGradSync | None):
    """The executor's one seam after each backward pass: ZeRO-2's reduction, then the mirror sums it made due."""
    if mirror is None:
        return optimizer.after_backward

    def after_backward() -> None:
        optimizer.after_backward()
        mirror.after_backward()

    return after_backward


def _cpu_used(before, after) -> dict[str, float]:
    return {"user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "minor_faults": float(after.ru_minflt - before.ru_minflt),
            "involuntary_switches": float(after.ru_nivcsw - before.ru_nivcsw)}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
