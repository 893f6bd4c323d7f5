"""A training step on paper: per-chunk costs through the schedule simulator, plus what happens around it.

``plan_step`` builds the same action lists the runtime executes (``raymoe.schedule.build_schedule``), prices every
action from ``raymoe.plan.chunks`` and runs ``raymoe.schedule.simulate`` for the pipeline's makespan. How the
expert all-to-all enters each action is the schedule's business, and it is explicit:

  * DualPipe / DualPipeV F&B pairs (``FB`` actions): one chunk's all-to-all runs while the other chunk computes, so
    the pair costs ``max(compute / (1 - comm_sm_fraction), all-to-all)``: the compute slowed by the SMs the
    communication kernels take, or the communication if that is longer (then exposed); a pair with no
    all-to-all (ep = 1, or dense chunks) costs its compute;
  * every other F, B or I (1F1B, GPipe, ZB1P, and DualPipe's warm-up and cool-down): the all-to-all is exposed,
    less the shared expert's compute when ``overlap_shared_expert`` (DeepSeek-V2 overlapped these); W has none.

Pipeline sends are the simulator's P2P latency. After the makespan: the data-parallel gradient reduction and
parameter all-gather (exposed but for ``dp_overlap``) and the optimizer (memory-bound). The breakdown splits the
step of the busiest rank into compute, exposed communication, SM share lost to overlapped communication, bubble
(waiting on the pipeline, pipeline sends included), data-parallel reduction and optimizer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from raymoe.config import Config
from raymoe.plan.activations import peak_live_bytes
from raymoe.plan.assumptions import Assumptions
from raymoe.plan.chunks import ChunkCost, chunk_costs
from raymoe.plan.comm import AllToAll, Reduction, all_to_all, dp_reduction, p2p_seconds
from raymoe.plan.destinations import Destinations, expected_destinations
from raymoe.plan.devices import DeviceSpec
from raymoe.plan.memory import BytesPerElement, Layout, MemoryPlan, plan_memory, split_layers
from raymoe.plan.params import count_params
from raymoe.schedule import Costs, Kind, build_schedule, simulate
from raymoe.schedule.simulator import SimResult


@dataclass(frozen=True, kw_only=True)
class RankMemory:
    pp_rank: int
    state_bytes: int
    """Parameters + gradients + optimizer state (``raymoe.plan.memory``)."""
    activation_bytes: float
    """Peak live activations under the assumed recomputation."""
    activation_bytes_no_recompute: float
    activation_bytes_recompute: float
    peak_live_microbatches: int
    """The simulator's peak live (stage, micro-batch) activations on this rank."""

    @property
    def total_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes

    def as_dict(self) -> dict[str, float]:
        return {"pp_rank": self.pp_rank, "state_bytes": self.state_bytes, "activation_bytes": self.activation_bytes,
                "activation_bytes_no_recompute": self.activation_bytes_no_recompute,
                "activation_bytes_recompute": self.activation_bytes_recompute,
                "peak_live_microbatches": self.peak_live_microbatches, "total_bytes": self.total_bytes}


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    layout: Layout
    num_microbatches: int
    tokens_per_microbatch: int
    """Per rank (per pipeline)."""
    tokens_per_step: int
    num_devices: int
    device: DeviceSpec
    assume: Assumptions
    destinations: Destinations
    a2a: AllToAll
    p2p_bytes: float
    """One pipeline send: a micro-batch's hidden states (or their gradient)."""
    p2p_s: float
    chunks: tuple[ChunkCost, ...]
    costs: Costs
    sim: SimResult
    memory: MemoryPlan
    rank_memory: tuple[RankMemory, ...]
    reduction: Reduction
    optimizer_s: float
    breakdown: dict[str, float]
    """Seconds of the step on the busiest rank by cause; sums to ``step_s``."""
    model_flops_per_step: float

    @property
    def dp_exposed_s(self) -> float:
        return self.reduction.seconds * (1 - self.assume.dp_overlap)

    @property
    def step_s(self) -> float:
        return self.sim.makespan + self.dp_exposed_s + self.optimizer_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        return self.model_flops_per_step / (self.step_s * self.num_devices * self.device.peak_bf16_tflops * 1e12)

    @property
    def peak_memory(self) -> RankMemory:
        return max(self.rank_memory, key=lambda r: (r.total_bytes, -r.pp_rank))

    @property
    def usable_bytes(self) -> float:
        return self.device.memory_gb * 1e9 * self.assume.usable_memory_fraction

    @property
    def fits(self) -> bool:
        return self.peak_memory.total_bytes <= self.usable_bytes

    def gpu_hours(self, tokens: float) -> float:
        return tokens / self.tokens_per_s * self.num_devices / 3600

    def wall_hours(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 3600


def _tokens_per_microbatch(cfg: Config, layout: Layout, num_microbatches: int) -> int:
    per_step = layout.dp * num_microbatches
    if cfg.data.batch_size % per_step:
        raise ValueError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by dp x micro-batches "
                         f"({layout.dp} x {num_microbatches} = {per_step})")
    return cfg.data.batch_size // per_step * cfg.data.seq_len


def _exposed(a2a: float, shared: float, assume: Assumptions) -> float:
    return max(0.0, a2a - shared) if assume.overlap_shared_expert else a2a


def _action_costs(schedule, chunks: tuple[ChunkCost, ...], assume: Assumptions, p2p_s: float):
    """Per-chunk simulator costs, and each (kind, chunk)'s split into compute / exposed comm / SM overhead."""
    per_chunk: dict[tuple[str, int], float] = {}
    split: dict[tuple[str, int], tuple[float, float, float]] = {}
    for c in chunks:
        ex_f, ex_b = _exposed(c.a2a_f, c.shared_f, assume), _exposed(c.a2a_b, c.shared_b, assume)
        for kind, compute, comm in (("F", c.f, ex_f), ("B", c.b, ex_b), ("W", c.w, 0.0), ("I", c.b - c.w, ex_b)):
            per_chunk[kind, c.chunk] = compute + comm
            split[kind, c.chunk] = (compute, comm, 0.0)
    placement = schedule.placement
    for acts in schedule.actions.values():
        for a in acts:
            if a.kind is not Kind.FB:
                continue
            cf, cb = placement.info(a.stage).chunk, placement.info(a.b_stage).chunk
            fwd, bwd = chunks[cf], chunks[cb]
            compute = fwd.f + bwd.b
            comm = fwd.a2a_f + bwd.a2a_b
            # SMs are lent only to an all-to-all that exists (ep > 1 and the pair has MoE layers).
            slowed = compute / (1 - assume.comm_sm_fraction) if comm > 0 else compute
            cost = max(slowed, comm)
            if per_chunk.get(("FB", cf), cost) != cost:
                raise AssertionError(f"FB pairs forward chunk {cf} with different backward chunks")
            per_chunk["FB", cf] = cost
            split["FB", cf] = (compute, cost - slowed, slowed - compute)
    first = chunks[0]
    costs = Costs(f=first.f, b=first.b, w=first.w, p2p=p2p_s, per_chunk=per_chunk)
    return costs, split


def _breakdown(sim: SimResult, schedule, split) -> dict[str, float]:
    placement = schedule.placement
    parts: dict[int, dict[str, float]] = defaultdict(lambda: {"compute": 0.0, "a2a_exposed": 0.0,
                                                               "comm_sm_share": 0.0})
    for e in sim.events:
        compute, comm, sm = split[e.action.kind.value, placement.info(e.action.stage).chunk]
        parts[e.rank]["compute"] += compute
        parts[e.rank]["a2a_exposed"] += comm
        parts[e.rank]["comm_sm_share"] += sm
    busiest = max(sim.per_rank, key=lambda s: s.busy).rank
    out = dict(parts[busiest])
    out["bubble"] = sim.makespan - sum(out.values())
    out["rank"] = busiest
    return out


def plan_step(cfg: Config, layout: Layout, *, device: DeviceSpec, assume: Assumptions,
              num_microbatches: int | None = None) -> StepPlan:
    """The step time, memory and throughput of ``cfg`` laid out as ``layout`` on ``device`` (module docstring)."""
    m, r = cfg.model, cfg.routing
    mbs = cfg.schedule.num_microbatches if num_microbatches is None else num_microbatches
    tokens = _tokens_per_microbatch(cfg, layout, mbs)
    act_bytes = 2 if cfg.precision.dtype == "bf16" else 4
    per_node = min(layout.ep, device.devices_per_node)
    groups, kept = (r.num_groups, r.groups_kept) if r.num_groups > 1 else (1, 1)
    dest = expected_destinations(num_experts=m.num_routed_experts, num_groups=groups, groups_kept=kept,
                                 top_k=r.top_k, ep=layout.ep, ranks_per_node=per_node)
    a2a = all_to_all(tokens=tokens, dim=m.dim, dest=dest, device=device, fp8=cfg.precision.fp8, act_bytes=act_bytes,
                     remote_ranks=None if assume.a2a_remote_ranks < 0 else assume.a2a_remote_ranks,
                     remote_nodes=None if assume.a2a_remote_nodes < 0 else assume.a2a_remote_nodes)
    ranges = split_layers(m.num_layers, layout)
    chunks = chunk_costs(cfg, layer_ranges=ranges, tokens=tokens, device=device, assume=assume, a2a=a2a)
    schedule = build_schedule(layout.schedule, layout.pp, mbs)
    # Pipeline neighbours are different nodes once one stage's dp ranks fill a node.
    p2p_s = p2p_seconds(tokens=tokens, dim=m.dim, act_bytes=act_bytes, device=device,
                        inter_node=layout.dp >= device.devices_per_node, latency_s=assume.p2p_latency_s)
    costs, split = _action_costs(schedule, chunks, assume, p2p_s)
    sim = simulate(schedule, costs)

    params = count_params(m, top_k=r.top_k, mtp_depth=cfg.mtp.depth)
    bytes_per = BytesPerElement.from_precision(cfg.precision, fp32_grads=assume.fp32_grads)
    memory = plan_memory(params, layout, bytes_per, num_routed_experts=m.num_routed_experts)
    placement = schedule.placement
    rank_memory = []
    for device_mem in memory.devices:
        rank = device_mem.pp_rank
        acts = schedule.compute_actions(rank)
        variants = [peak_live_bytes(acts, lambda s, k=k: getattr(chunks[placement.info(s).chunk], k))
                    for k in ("act_bytes", "act_bytes_no_recompute", "act_bytes_recompute")]
        rank_memory.append(RankMemory(
            pp_rank=rank, state_bytes=device_mem.total_bytes, activation_bytes=variants[0],
            activation_bytes_no_recompute=variants[1], activation_bytes_recompute=variants[2],
            peak_live_microbatches=sim.per_rank[rank].peak_activations))
    heaviest = max(memory.devices, key=lambda d: d.dense_params + d.expert_params)
    copies = 2 if layout.schedule == "dualpipe" and layout.pp > 1 else 1
    reduction = dp_reduction(dense_params=heaviest.dense_params, expert_params=heaviest.expert_params,
                             dp=layout.dp, ep=layout.ep, copies=copies, grad_bytes=bytes_per.grad,
                             param_bytes=bytes_per.param, zero_stage=layout.zero_stage, device=device)
    # AdamW on this rank's shard: read the gradient, read/write master and moments, write the parameter.
    shard = heaviest.optimizer_bytes / max(bytes_per.optimizer, 1)
    touched = shard * (bytes_per.grad + 2 * bytes_per.optimizer + bytes_per.param)
    optimizer_s = touched / (device.hbm_gbps * 1e9 * assume.hbm_efficiency)
    breakdown = _breakdown(sim, schedule, split)
    breakdown["dp_reduction_exposed"] = reduction.seconds * (1 - assume.dp_overlap)
    breakdown["optimizer"] = optimizer_s
    model_flops = 3 * sum(c.fwd_flops for c in chunks) * mbs * layout.dp
    return StepPlan(
        layout=layout, num_microbatches=mbs, tokens_per_microbatch=tokens,
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len, num_devices=layout.pp * layout.dp, device=device,
        assume=assume, destinations=dest, a2a=a2a, p2p_bytes=tokens * m.dim * act_bytes, p2p_s=p2p_s,
        chunks=chunks, costs=costs, sim=sim,
        memory=memory, rank_memory=tuple(rank_memory), reduction=reduction, optimizer_s=optimizer_s,
        breakdown=breakdown, model_flops_per_step=model_flops)
