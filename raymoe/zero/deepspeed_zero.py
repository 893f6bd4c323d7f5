"""ZeRO-1 through DeepSpeed around torch AdamW. With ``deepspeed_zero2.py``, the only code that touches DeepSpeed,
and the only module that imports it.

ZeRO stage 1 (what DeepSeek-V3 ran with its pipeline) partitions the optimizer state over the data-parallel
replicas of a pipeline stage: each of the ``dp`` ranks keeps Adam's two moments and the fp32 master weights for
1/dp of the stage's parameters. At the step, gradients are averaged over the stage's dp group, each rank updates
its partition, and the updated weights are all-gathered. Per-rank optimizer memory is therefore 1/dp of the
replicated size (``OptimizerMemory``; the tests check it halves from dp=1 to dp=2).

Two things DeepSpeed does not do for our pipeline, done here:

* **Global gradient clipping.** The clip coefficient must come from the norm of the *whole* model's gradient,
  which is spread over the pipeline stages. DeepSpeed computes the norm of one engine (one stage), and rounds
  it to fp32 between its steps (per partition, after the dp all-reduce, per parameter group), so a layout's
  norm would differ from the reference's in its last bits and so would the clip factor (``raymoe.train.clip``
  says why that matters). We replace that computation: the squares of this rank's partition of the averaged
  gradients summed in float64 (``squared_norm``), one all-reduce over the stage's dp group and one over the
  pipeline group, and the factor of ``clip_coefficient`` -- the sum and factor the reference computes.
  Replicated parameters (the tied embedding copy, DualPipe's mirrored copy) are marked ``ds_pipe_replicated``
  so they are counted once. (Handing DeepSpeed the pipeline group as its "model parallel" group would also make
  the norm global, but hangs when stages have different parameter groups; cf. DeepSpeed issue #6714.)
* **Caller-owned accumulation.** The pipeline executor runs the backward passes itself
  (``managed_gradient_accumulation: false``); ``engine.step()`` then reduces, clips and steps.

Set-up facts (measured on CPU + gloo inside Ray actors): DeepSpeed asserts on ``LOCAL_RANK`` (Ray does not set
it); its first communication set-up JIT-builds a shared-memory op (~60 s) used only for inference all-reduce,
skipped by emptying ``deepspeed.ops.__compatible_ops__``; ``deepspeed.initialize`` then takes ~2 s.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist
from torch import nn

from raymoe.checkpoint.reshard import (
    adamw_shard_state,
    adamw_state_dict,
    check_kind,
    load_adamw_param_states,
    load_adamw_shard_state,
)
from raymoe.config import OptimConfig
from raymoe.fp8 import optimizer_state_bytes
from raymoe.train.clip import clip_coefficient, squared_norm
from raymoe.train.optim import make_adamw, set_lr
from raymoe.zero.common import (
    ExpertSplit,
    OptimizerMemory,
    held_grad_bytes,
    pipeline_norm,
    replicated_mean_gradients,
    stage_adamw,
)


class _StageMpu:
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


def import_deepspeed(backend: str):
    """Import DeepSpeed for an already initialised torch.distributed world (see the module docstring)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if backend == "gloo" else "cuda")
    os.environ.setdefault("LOCAL_RANK", "0")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="raymoe-torch-extensions-")
    import warnings

    import deepspeed
    import deepspeed.ops

    # DeepSpeed still calls the deprecated all_gather_into_tensor; one warning per rank and step is noise.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)

    deepspeed.ops.__compatible_ops__ = {}  # skip the ~60 s JIT build of the inference-only shm all-reduce
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines, once per rank, drown the progress bar
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
    return deepspeed


class DeepSpeedZero:
    """ZeRO-1: optimizer state partitioned over the dp group; gradients reduced once, at the step."""

    def __init__(
        self,
        module: nn.Module,
        optim: OptimConfig,
        *,
        zero_stage: int,
        dp_group,
        pp_group,
        not_in_norm: Collection[nn.Parameter] = (),
        micro_batch_size: int,
        num_microbatches: int,
        backend: str = "gloo",
        bf16_moments: bool = False,
        experts: ExpertSplit | None = None,
    ) -> None:
        deepspeed = import_deepspeed(backend)
        for p in not_in_norm:
            p.ds_pipe_replicated = True  # DeepSpeed's own flag: skipped by its norm
        self._name_of = {id(p): n for n, p in module.named_parameters()}
        self.experts = experts
        self.dp_group = dp_group
        self.pp_group = pp_group
        self._grad_bytes = 0
        self._fixed_norm: torch.Tensor | None = None
        self.ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": num_microbatches,
            "zero_optimization": {
                "stage": zero_stage,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_bucket_size": 50_000_000,
                "allgather_bucket_size": 50_000_000,
            },
            "managed_gradient_accumulation": False,
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self.params = [p for p in module.parameters() if p.requires_grad]
        if experts is None:
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=module, optimizer=stage_adamw(module, optim, bf16_moments), config=self.ds_config,
                mpu=_StageMpu(dp_group), dist_init_required=False,
            )
            self.expert_part = None
        else:
            # Two partitions: dense parameters over the dp group, the expert shard over its expert-data-parallel
            # group (a DeepSpeed ZeRO-1 of its own; plain AdamW when the shard has no replica, edp = 1).
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            dense = [(n, p) for n, p in named if not experts.holds(p)]
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=_Holder(dense), optimizer=make_adamw(dense, optim, bf16_moments=bf16_moments),
                config=self.ds_config, mpu=_StageMpu(dp_group), dist_init_required=False,
            )
            self.expert_part = _ExpertPart(
                deepspeed, [(n, p) for n, p in named if experts.holds(p)], optim, experts, self.ds_config,
                bf16_moments,
            )
        self._wrap_norm_and_clip(self.zero, optim.grad_clip, dp_group, pp_group)

    def after_backward(self) -> None:
        pass  # ZeRO-1 reduces at the step

    def mean_gradients(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        return replicated_mean_gradients(params, self.dp_group, self.experts)

    def _held_grad_bytes(self) -> int:
        return held_grad_bytes(self.params)

    def _wrap_norm_and_clip(self, zero, max_norm: float, dp_group, pp_group) -> None:
        # The override reads averaged_gradients: CPU offload keeps its gradients elsewhere, and DeepSpeed MoE groups
        # would need their norms averaged over their own groups. Neither is configured here; refuse, not mis-clip.
        if zero.has_moe_layers or zero.cpu_offload:
            raise NotImplementedError("the global-norm override handles neither DeepSpeed MoE parameter groups nor "
                                      f"CPU offload (has_moe_layers={zero.has_moe_layers}, "
                                      f"cpu_offload={zero.cpu_offload})")
        self._last_norm = torch.zeros((), dtype=torch.float64)

        def global_norm(norm_type: int = 2) -> torch.Tensor:
            if norm_type != 2:
                raise ValueError(f"only the L2 gradient norm is supported, got norm_type={norm_type}")
            if self._fixed_norm is not None:  # expert parallelism: computed over both partitions before the step
                return self._fixed_norm
            partition_sq = squared_norm(partition_grads(zero), device=zero.device)
            dist.all_reduce(partition_sq, group=dp_group)  # the stage's partitions
            self._last_norm = pipeline_norm(partition_sq, pp_group)
            return self._last_norm

        def clip(grad_groups_flat, total_norm) -> None:
            if max_norm > 0:
                coef = clip_coefficient(total_norm, max_norm)
                for g in grad_groups_flat:
                    g.mul_(coef.to(g.device, g.dtype))

        # Instance attributes shadow the optimizer's methods; step() calls them by name.
        zero.scaled_global_norm = global_norm
        zero.unscale_and_clip_grads = clip

    def step(self, lr: float) -> float:
        self._grad_bytes = self._held_grad_bytes()
        set_lr(self.zero.optimizer, lr)
        _setup_buckets(self.zero)
        if self.expert_part is None:
            self.engine.step()
            return float(self._last_norm)
        # Expert parallelism: reduce both partitions first, one norm over both, then both updates with its factor.
        self.expert_part.reduce()
        _reduce(self.engine)
        partition_sq = squared_norm(partition_grads(self.zero), device=self.zero.device)
        partition_sq = partition_sq + self.expert_part.partition_sq()
        dist.all_reduce(partition_sq, group=self.dp_group)  # dense and expert partitions both tile the dp group
        self._last_norm = self._fixed_norm = pipeline_norm(partition_sq, self.pp_group)
        try:
            _step_reduced(self.engine)
            self.expert_part.step(lr, self._fixed_norm)
        finally:
            self._fixed_norm = None
        return float(self._last_norm)

    def memory(self) -> OptimizerMemory:
        master = sum(t.numel() * t.element_size() for t in self.zero.single_partition_of_fp32_groups)
        state = optimizer_state_bytes(self.zero.optimizer)
        if self.expert_part is not None:
            master += self.expert_part.master_bytes()
            state += self.expert_part.state_bytes()
        return OptimizerMemory(state_bytes=state, master_bytes=master, grad_bytes=self._grad_bytes)

    def state_dict(self) -> dict:
        """This rank's partition: its flat fp32 master weights and the AdamW state over them (and, with expert
        parallelism, under ``experts``, the expert shard's own partition or AdamW state, named by global id).

        Not DeepSpeed's own ``state_dict()``, which pickles DeepSpeed objects (its loss scaler) and could then only
        be read by unpickling arbitrary classes; the model's parameters are saved beside this, in the same shard.
        """
        state = zero_partition_state(self.zero, self._name_of)
        if self.expert_part is not None:
            state["experts"] = self.expert_part.state_dict()
        return state

    def _partition_slices(self):
        return partition_slices(self.zero)

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """The fp32 master partition from the (already loaded) parameters, and AdamW's state over it from
        ``states`` (created here if the optimizer never stepped; the padding's moments stay zero)."""
        load_zero_param_states(self.zero, self._name_of, states)
        if self.expert_part is not None:
            self.expert_part.load_param_states(states)

    def load_state_dict(self, state: dict) -> None:
        load_zero_partition_state(self.zero, state)
        if self.expert_part is not None:
            if "experts" not in state:
                raise ValueError("this checkpoint's optimizer state has no expert partition (saved without "
                                 "expert parallelism); resume it with --reshard")
            self.expert_part.load_state_dict(state["experts"])


def _setup_buckets(zero) -> None:
    if not zero.partition_gradients:
        # ZeRO-1 sets up its reduction buffers from a gradient-accumulation hook. A zero-bubble W adds its
        # deferred weight gradients to .grad directly (raymoe.parallel.weight_grad), so on a stage whose every
        # backward was split that hook may never fire: set the buffers up here (a no-op when a hook already did).
        zero.setup_buckets()


def _reduce(engine) -> None:
    """The reduction ``engine.step()`` starts with, alone. With caller-owned accumulation DeepSpeed treats only the
    inside of ``step()`` as the accumulation boundary (``_running_engine_step``), and ZeRO-1 reduces only there."""
    engine._running_engine_step = True
    try:
        engine.allreduce_gradients()
    finally:
        engine._running_engine_step = False


def _step_reduced(engine) -> None:
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


class _Holder(nn.Module):
    """A module that only *holds* some of a stage's parameters, for a DeepSpeed engine that partitions them: the
    executor runs the stage itself, never this module."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self.held = nn.ParameterList([p for _, p in named])

    def forward(self, *args):  # pragma: no cover - never called
        raise RuntimeError("a parameter holder has no forward")


class _ExpertPart:
    """The optimizer of this rank's expert shard: ZeRO-1 over the expert-data-parallel group (DeepSpeed), or plain
    AdamW when the shard has no replica (edp = 1). Its gradients are scaled to the dense parameters' 1/dp."""

    def __init__(self, deepspeed, named: list[tuple[str, nn.Parameter]], optim: OptimConfig,
                 experts: ExpertSplit, ds_config: dict, bf16_moments: bool) -> None:
        self.params = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.name_of = {id(p): n for n, p in named}
        self.experts = experts
        self.max_norm = optim.grad_clip
        if experts.edp_group is None:
            self.engine = self.zero = None
            self.adamw = make_adamw(named, optim, bf16_moments=bf16_moments)
        else:
            self.adamw = None
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=_Holder(named), optimizer=make_adamw(named, optim, bf16_moments=bf16_moments),
                config=ds_config, mpu=_StageMpu(experts.edp_group), dist_init_required=False,
            )
            self.zero.scaled_global_norm = lambda norm_type=2: self._norm
            self.zero.unscale_and_clip_grads = self._clip
        self._norm = torch.zeros((), dtype=torch.float64)

    def _clip(self, grad_groups_flat, total_norm) -> None:
        if self.max_norm > 0:
            coef = clip_coefficient(total_norm, self.max_norm)
            for g in grad_groups_flat:
                g.mul_(coef.to(g.device, g.dtype))

    def reduce(self) -> None:
        """Sum over the expert-data-parallel group and scale by 1/dp (ZeRO divides by edp itself: pre-scale by
        edp / dp = 1 / ep)."""
        for p in self.params:
            if p.grad is None:  # an idle expert: a zero gradient keeps every replica's optimizer in step
                p.grad = torch.zeros_like(p)
        if self.zero is None:
            for p in self.params:
                p.grad.div_(self.experts.dp_size)
            return
        edp = dist.get_world_size(self.experts.edp_group)
        for p in self.params:
            p.grad.mul_(edp / self.experts.dp_size)
        _setup_buckets(self.zero)
        _reduce(self.engine)

    def partition_sq(self) -> torch.Tensor:
        """Squares of this rank's piece of the expert gradients: its ZeRO partition, or its whole shard."""
        if self.zero is not None:
            return squared_norm(partition_grads(self.zero), device=self.zero.device)
        counted = (p.grad for p in self.params if not getattr(p, "ds_pipe_replicated", False))
        return squared_norm(counted, device=self.params[0].device if self.params else "cpu")

    def step(self, lr: float, total_norm: torch.Tensor) -> None:
        if self.zero is not None:
            self._norm = total_norm
            set_lr(self.zero.optimizer, lr)
            _step_reduced(self.engine)
            return
        if self.max_norm > 0:
            coef = clip_coefficient(total_norm, self.max_norm)
            for p in self.params:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        set_lr(self.adamw, lr)
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)

    def master_bytes(self) -> int:
        if self.zero is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.zero.single_partition_of_fp32_groups)

    def state_bytes(self) -> int:
        return optimizer_state_bytes(self.zero.optimizer if self.zero is not None else self.adamw)

    def state_dict(self) -> dict:
        if self.zero is not None:
            return zero_partition_state(self.zero, self.name_of)
        return adamw_shard_state(self.adamw, self.names)

    def load_state_dict(self, state: dict) -> None:
        if self.zero is not None:
            load_zero_partition_state(self.zero, state)
        else:
            load_adamw_shard_state(self.adamw, state, source="expert shard")

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.zero is not None:
            load_zero_param_states(self.zero, self.name_of, states)
        else:
            load_adamw_param_states(self.adamw, self.names, states)
