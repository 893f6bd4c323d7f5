"""Per-device bytes of parameters, gradients and optimizer state for a pp x ep x dp layout.

The model is cut into pipeline stages of whole transformer layers; each pp rank holds one stage, or two with
DualPipe/DualPipeV. Within a stage, the routed experts of every MoE layer are split over ``ep`` ranks and
everything else (attention, norms, dense FFN, gate, shared experts, embedding, head) is replicated. ZeRO
then shards state over data parallelism (DeepSpeed semantics, as ``raymoe/zero`` uses them):

  * dense parameters are data-parallel over all ``dp`` ranks of their stage (``dp`` already includes the
    ``ep`` ranks: an expert-parallel group is a slice of the data-parallel one);
  * expert parameters are data-parallel only over the ``dp // ep`` ranks that hold the same experts (the
    expert-data-parallel group);
  * ZeRO-1 shards the optimizer state (fp32 master copy + two Adam moments) over those groups; ZeRO-2 also
    shards the gradients; ZeRO-0 shards nothing. Parameters are never sharded (no ZeRO-3).

Where the embedding and head live:
  * the embedding belongs to the first stage; the final norm, output head and MTP modules to the last;
  * MTP also looks up the *shared* embedding. DualPipe places stage 0 and the last stage on the same rank
    (rank r holds stages r and pp-1-r; DualPipeV's rank 0 holds stages 0 and 2pp-1), so one physical copy
    serves both, as the paper describes (section 3.2.3). With one stage per rank (GPipe, 1F1B, ZB1P) the
    last stage keeps its own copy of the embedding, kept equal by all-reducing its gradient with stage 0's
    (Megatron's tied-embedding scheme); that copy is counted with its gradient and optimizer state;
  * DualPipe keeps two copies of every stage (ranks r and pp-1-r hold the same pair), the 2x parameter cost
    of the paper's Table 2. We assume each copy's optimizer state is sharded only over its own ``dp`` group.

Activations are not counted: they depend on the schedule's in-flight micro-batches (see ``raymoe.schedule``).

Legend: S pipeline stages, P pp ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.config import PrecisionConfig
from raymoe.config.schema import SCHEDULES
from raymoe.plan.params import ModelParams
from raymoe.schedule.layout_rules import check_ep_divides_dp, layer_counts, num_chunks, rank_chunks


@dataclass(frozen=True, kw_only=True)
class Layout:
    pp: int = 1
    ep: int = 1
    dp: int = 1
    """Data-parallel degree of the dense parameters; experts are data-parallel over dp // ep."""
    zero_stage: int = 1
    schedule: str = "1f1b"
    stage_layers: tuple[int, ...] = ()
    """Layers per pipeline stage; empty = as even as possible (earlier stages take the remainder)."""

    def __post_init__(self) -> None:
        for name, value in (("pp", self.pp), ("ep", self.ep), ("dp", self.dp)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        check_ep_divides_dp(self.ep, self.dp)
        if self.schedule == "dualpipe" and self.pp > 1 and self.pp % 2:
            raise ValueError(
                f"schedule dualpipe pairs stage r with stage pp-1-r and needs an even pp, got {self.pp}"
            )

    @property
    def num_stages(self) -> int:
        return num_chunks(self.schedule, self.pp)

    @property
    def expert_dp(self) -> int:
        return self.dp // self.ep

    def stages_of_rank(self, rank: int) -> tuple[int, ...]:
        return rank_chunks(self.schedule, self.pp, rank)


@dataclass(frozen=True, kw_only=True)
class BytesPerElement:
    param: int
    grad: int
    master: int
    """fp32 master copy of bf16 parameters (0 when parameters are fp32 already)."""
    moments: int
    """Both Adam moments together."""

    @classmethod
    def from_precision(cls, precision: PrecisionConfig, *, fp32_grads: bool = False) -> BytesPerElement:
        """Gradients take the parameter dtype (DeepSpeed's bf16 default) unless ``fp32_grads`` asks for the
        paper's fp32 gradient accumulation."""
        param = 2 if precision.dtype == "bf16" else 4
        return cls(
            param=param,
            grad=4 if fp32_grads else param,
            master=4 if param < 4 else 0,
            moments=2 * (2 if precision.bf16_optimizer_states else 4),
        )

    @property
    def optimizer(self) -> int:
        return self.master + self.moments


@dataclass(frozen=True, kw_only=True)
class DeviceMemory:
    """One device of pp rank ``pp_rank`` (all ep/dp ranks of a pp rank hold the same amounts)."""

    pp_rank: int
    stages: tuple[int, ...]
    layers: tuple[int, ...]
    dense_params: int
    """Replicated parameters on this device (elements)."""
    expert_params: int
    """This device's 1/ep of its stages' routed experts (elements)."""
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def as_dict(self) -> dict[str, object]:
        return {
            "pp_rank": self.pp_rank,
            "stages": list(self.stages),
            "layers": list(self.layers),
            "dense_params": self.dense_params,
            "expert_params": self.expert_params,
            "param_bytes": self.param_bytes,
            "grad_bytes": self.grad_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    layout: Layout
    bytes_per: BytesPerElement
    devices: tuple[DeviceMemory, ...]

    @property
    def peak(self) -> DeviceMemory:
        """The most loaded device; the first pp rank among equals."""
        return max(self.devices, key=lambda d: (d.total_bytes, -d.pp_rank))


def split_layers(num_layers: int, layout: Layout) -> tuple[range, ...]:
    """Layer ids of each stage, in stage order (the runtime's cut: ``raymoe.schedule.layout_rules``)."""
    try:
        counts = layer_counts(num_layers, layout.num_stages, layout.stage_layers)
    except ValueError as exc:
        raise ValueError(f"pp={layout.pp}, schedule {layout.schedule}: {exc}") from None
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return tuple(range(start, start + count) for start, count in zip(starts, counts))


def _shard(elems: int, ways: int) -> int:
    return -(-elems // ways)  # ZeRO pads partitions to equal size: round up.


def plan_memory(
    params: ModelParams, layout: Layout, bytes_per: BytesPerElement, *, num_routed_experts: int
) -> MemoryPlan:
    """Bytes on every pp rank's devices for ``params`` laid out as ``layout``."""
    if num_routed_experts % layout.ep:
        raise ValueError(f"num_routed_experts ({num_routed_experts}) must be divisible by ep ({layout.ep})")
    stage_ranges = split_layers(len(params.layers), layout)
    last = layout.num_stages - 1
    devices = []
    for rank in range(layout.pp):
        stages = layout.stages_of_rank(rank)
        layer_ids = tuple(i for s in sorted(stages) for i in stage_ranges[s])
        held = [params.layers[i] for i in layer_ids]
        dense = sum(layer.non_expert for layer in held)
        expert = sum(layer.routed_experts for layer in held)
        if 0 in stages:
            dense += params.embedding
        if last in stages:
            dense += params.final_norm + params.head
            dense += sum(m.total - m.block.routed_experts for m in params.mtp)
            expert += sum(m.block.routed_experts for m in params.mtp)
            if params.mtp and 0 not in stages:
                dense += params.embedding  # MTP's copy of the shared embedding (see the module docstring)
        devices.append(_device_memory(rank, stages, layer_ids, dense, expert // layout.ep, layout, bytes_per))
    return MemoryPlan(layout=layout, bytes_per=bytes_per, devices=tuple(devices))


def _device_memory(
    rank: int,
    stages: tuple[int, ...],
    layer_ids: tuple[int, ...],
    dense: int,
    expert: int,
    layout: Layout,
    bytes_per: BytesPerElement,
) -> DeviceMemory:
    local = dense + expert
    # The shard of this device's state that ZeRO keeps: dense state over dp, expert state over dp // ep.
    sharded = _shard(dense, layout.dp) + _shard(expert, layout.expert_dp)
    grad_elems = sharded if layout.zero_stage >= 2 else local
    optim_elems = sharded if layout.zero_stage >= 1 else local
    return DeviceMemory(
        pp_rank=rank,
        stages=stages,
        layers=layer_ids,
        dense_params=dense,
        expert_params=expert,
        param_bytes=local * bytes_per.param,
        grad_bytes=grad_elems * bytes_per.grad,
        optimizer_bytes=optim_elems * bytes_per.optimizer,
    )
