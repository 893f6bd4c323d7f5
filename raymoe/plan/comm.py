"""Communication of one training step: expert all-to-all, pipeline sends, data-parallel reductions.

Expert all-to-all (one MoE layer, one micro-batch, per rank; DeepEP's scheme, DESIGN.md): a token goes once to each
distinct destination node other than its own over InfiniBand (landing on the GPU with its own local index there),
and from there, or from its own GPU, once over NVLink to each distinct destination rank in that node other than the
landing GPU. With ``R`` ranks per node a given GPU is the landing GPU of a hit node with chance 1/R, so

    IB copies per token     = remote_nodes
    NVLink copies per token = ranks x (1 - 1/R)

(``raymoe.plan.destinations`` gives both expectations). The two links run at once; a transfer takes the longer of
the two. Forward: dispatch in FP8 (E4M3 plus one fp32 scale per 128 elements) and combine in BF16, the paper's
choice; the backward sends the gradient to the experts in FP8 and back in BF16, the same bytes. Without FP8 both
directions use the activation dtype.

Pipeline sends carry one micro-batch's hidden states (tokens x D) in the activation dtype, forward and backward.

ZeRO-1 data parallelism: after the pipeline drains, gradients are reduce-scattered over the dense data-parallel
group (dp ranks, x2 for DualPipe's mirrored copies whose gradients must be summed too) and the expert group (dp/ep),
and the updated parameters all-gathered: a ring moves (n-1)/n of the buffer per rank each way. ZeRO-2 moves the
same bytes, spread over the backward passes. These run over the inter-node link when the group spans nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.plan.activations import FP8_TILE_BYTES
from raymoe.plan.destinations import Destinations
from raymoe.plan.devices import DeviceSpec


@dataclass(frozen=True, kw_only=True)
class AllToAll:
    ib_bytes: float
    """Per rank, one direction (dispatch + combine) of one MoE layer on one micro-batch."""
    nvlink_bytes: float
    seconds: float
    """Forward (dispatch + combine); the backward moves the same bytes."""

    def as_dict(self) -> dict[str, float]:
        return {"ib_bytes": self.ib_bytes, "nvlink_bytes": self.nvlink_bytes, "seconds": self.seconds}


def all_to_all(*, tokens: int, dim: int, dest: Destinations, device: DeviceSpec, fp8: bool,
               act_bytes: int, remote_ranks: float | None = None, remote_nodes: float | None = None) -> AllToAll:
    """Bytes and seconds of one MoE layer's dispatch + combine for ``tokens`` tokens on one rank."""
    if dest.ep == 1:
        return AllToAll(ib_bytes=0.0, nvlink_bytes=0.0, seconds=0.0)
    per_token = dim * ((FP8_TILE_BYTES if fp8 else act_bytes) + act_bytes)  # dispatch + combine
    nodes = dest.remote_nodes if remote_nodes is None else remote_nodes
    ranks = dest.ranks if remote_ranks is None else remote_ranks + dest.ranks / dest.ep
    ib = tokens * nodes * per_token
    nvlink = tokens * ranks * (1 - 1 / dest.ranks_per_node) * per_token
    seconds = max(ib / (device.inter_node_gbps * 1e9), nvlink / (device.intra_node_gbps * 1e9))
    return AllToAll(ib_bytes=ib, nvlink_bytes=nvlink, seconds=seconds)


def p2p_seconds(*, tokens: int, dim: int, act_bytes: int, device: DeviceSpec, inter_node: bool,
                latency_s: float) -> float:
    """One pipeline send of a micro-batch's hidden states (or their gradient)."""
    bandwidth = device.inter_node_gbps if inter_node else device.intra_node_gbps
    return latency_s + tokens * dim * act_bytes / (bandwidth * 1e9)


def ring_seconds(buffer_bytes: float, ranks: int, gbps: float) -> float:
    """A ring reduce-scatter (or all-gather) of ``buffer_bytes`` over ``ranks``: (n-1)/n of it per rank."""
    if ranks <= 1:
        return 0.0
    return buffer_bytes * (ranks - 1) / ranks / (gbps * 1e9)


@dataclass(frozen=True, kw_only=True)
class Reduction:
    dense_ranks: int
    expert_ranks: int
    grad_bytes: float
    """Gradient bytes this rank reduce-scatters (dense + expert)."""
    param_bytes: float
    """Parameter bytes this rank all-gathers after the step."""
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {"dense_ranks": self.dense_ranks, "expert_ranks": self.expert_ranks, "grad_bytes": self.grad_bytes,
                "param_bytes": self.param_bytes, "seconds": self.seconds}


def dp_reduction(*, dense_params: int, expert_params: int, dp: int, ep: int, copies: int, grad_bytes: int,
                 param_bytes: int, zero_stage: int, device: DeviceSpec) -> Reduction:
    """Gradient reduction and (ZeRO >= 1) parameter all-gather of one rank's parameters, in seconds."""
    dense_ranks, expert_ranks = dp * copies, (dp // ep) * copies
    spans_nodes = dp * copies > device.devices_per_node
    gbps = device.inter_node_gbps if spans_nodes else device.intra_node_gbps
    seconds = 0.0
    for elems, ranks in ((dense_params, dense_ranks), (expert_params, expert_ranks)):
        reduce = ring_seconds(elems * grad_bytes, ranks, gbps)
        gather = ring_seconds(elems * param_bytes, ranks, gbps)
        # ZeRO-0 all-reduces (reduce-scatter + all-gather of the gradients); ZeRO-1/2 all-gather the parameters.
        seconds += reduce + (reduce if zero_stage == 0 else gather)
    return Reduction(dense_ranks=dense_ranks, expert_ranks=expert_ranks,
                     grad_bytes=(dense_params + expert_params) * grad_bytes,
                     param_bytes=(dense_params + expert_params) * param_bytes, seconds=seconds)
