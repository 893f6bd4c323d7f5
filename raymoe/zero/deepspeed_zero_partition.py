"""The pieces of a DeepSpeed ZeRO optimizer that raymoe drives by hand: the duck-typed mpu, the reduction and the
step split apart (so two partitions, dense and expert, can share one global norm), and a partition's state in a
shard (flat fp32 masters + AdamW, with the resharding index). Used by ``deepspeed_zero.py`` and
``deepspeed_zero_experts.py``; nothing here imports DeepSpeed (the engines are handed in)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raymoe.checkpoint.reshard import adamw_state_dict, check_kind


class StageMpu:
    """The duck-typed 'model parallel unit' DeepSpeed asks for groups: data parallel = this stage's replicas."""

    def __init__(self, dp_group) -> None:
        self._dp = dp_group

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_model_parallel_group(self):
        return None

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def setup_buckets(zero) -> None:
    if not zero.partition_gradients:
        # ZeRO-1 sets up its reduction buffers from a gradient-accumulation hook. A zero-bubble W adds its
        # deferred weight gradients to .grad directly (raymoe.parallel.weight_grad), so on a stage whose every
        # backward was split that hook may never fire: set the buffers up here (a no-op when a hook already did).
        zero.setup_buckets()


def reduce_at_step(engine) -> None:
    """The reduction ``engine.step()`` starts with, alone. With caller-owned accumulation DeepSpeed treats only the
    inside of ``step()`` as the accumulation boundary (``_running_engine_step``), and ZeRO-1 reduces only there."""
    engine._running_engine_step = True
    try:
        engine.allreduce_gradients()
    finally:
        engine._running_engine_step = False


def step_reduced(engine) -> None:
    """``engine.step()`` on gradients already reduced by ``engine.allreduce_gradients()``: the engine's own
    reduction at the step (ZeRO-1 reduces there) is switched off for this call."""
    engine.enable_backward_allreduce = False
    try:
        engine.step()
    finally:
        engine.enable_backward_allreduce = True


def partition_grads(zero):
    """What DeepSpeed's get_grad_norm_direct reads: this rank's slices of the dp-averaged gradients of each group,
    padding skipped, paired with their parameters (so that replicas can be skipped)."""
    for i in range(len(zero.bit16_groups)):
        grads = (g for g in zero.averaged_gradients[i] if not getattr(g, "_zero_padding", False))
        for g, p in zip(grads, zero.params_in_partition[i]):
            if not getattr(p, "ds_pipe_replicated", False):
                yield g


def zero_partition_state(zero, name_of: dict[int, str]) -> dict:
    """A ZeRO optimizer's partition as a shard keeps it: flat fp32 masters, AdamW over them, and which parameter
    each slice belongs to (by model name: the resharding index)."""
    return {
        "kind": "deepspeed-zero",
        "dp_rank": dist.get_rank(zero.dp_process_group),
        "dp_size": dist.get_world_size(zero.dp_process_group),
        "master": [t.detach().clone() for t in zero.single_partition_of_fp32_groups],
        "adamw": zero.optimizer.state_dict(),
        "slices": [[[name_of[id(p)], *where] for p, *where in group] for group in partition_slices(zero)],
    }


def partition_slices(zero) -> list[list[tuple[nn.Parameter, int, int, int]]]:
    """Per group: (param, start in this rank's flat partition, start in the flattened param, numel) for every
    parameter that overlaps the partition -- DeepSpeed's own mapping (``_hp_mapping``, None elsewhere)."""
    assert all(len(g["params"]) == 1 for g in zero.optimizer.param_groups), "one flat partition per group"
    slices = []
    for group in zero.bit16_groups:
        pieces = []
        for p in group:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                pieces.append((p, hp.start, lp.start, lp.numel))
        slices.append(pieces)
    return slices


def load_zero_param_states(zero, name_of: dict[int, str], states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Resharding: the fp32 master partition from the (already loaded) parameters, and AdamW's state over it from
    ``states`` (created here if the optimizer never stepped; the padding's moments stay zero)."""
    from raymoe.checkpoint.reshard import flat_state

    slices = partition_slices(zero)
    masters = zero.single_partition_of_fp32_groups
    with torch.no_grad():
        for master, pieces in zip(masters, slices):
            for p, part_start, param_start, numel in pieces:
                master.narrow(0, part_start, numel).copy_(p.detach().reshape(-1).narrow(0, param_start, numel))
    by_position = {}
    for group, (master, pieces) in enumerate(zip(masters, slices)):
        named = [[name_of[id(p)], *where] for p, *where in pieces]
        flat = flat_state(master.numel(), named, states, source=f"ZeRO partition group {group}")
        if flat is not None:
            by_position[group] = flat
    if by_position:
        zero.optimizer.load_state_dict(adamw_state_dict(zero.optimizer, by_position))


def load_zero_partition_state(zero, state: dict) -> None:
    """The inverse of ``zero_partition_state``, same layout (same partition of the same group)."""
    check_kind(state, "deepspeed-zero")
    dp_size = dist.get_world_size(zero.dp_process_group)
    if state["dp_size"] != dp_size or state["dp_rank"] != dist.get_rank(zero.dp_process_group):
        raise ValueError(f"ZeRO partition {state['dp_rank']}/{state['dp_size']} cannot load into rank "
                         f"{dist.get_rank(zero.dp_process_group)}/{dp_size}")
    live = zero.single_partition_of_fp32_groups
    shapes = [tuple(t.shape) for t in state["master"]]
    if shapes != [tuple(t.shape) for t in live]:
        raise ValueError(f"ZeRO master partition shapes {shapes} != this rank's {[tuple(t.shape) for t in live]}")
    with torch.no_grad():
        for target, saved in zip(live, state["master"]):
            target.copy_(saved)
    zero.optimizer.load_state_dict(state["adamw"])
