"""Who owns the optimizer state: DeepSpeed ZeRO around torch AdamW. The only module that imports deepspeed.

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

ZeRO stage 2 (``DeepSpeedZero2``) also partitions the *gradients*: after every backward pass (each micro-batch's
B, or the I and the W of a zero-bubble split) the fresh gradients are reduced over the dp group, each rank keeps
the averaged slice of its own partition, adds it to the slice it accumulates over the step, and frees the full
gradients. Between micro-batches and at the step a rank therefore holds ~1/dp of the stage's gradients instead of
all of them (``OptimizerMemory.grad_bytes``), at the price of one reduction per backward pass instead of one per
step. DeepSpeed does the reducing from gradient hooks during *its* backward; ours is the executor's, so:

* DeepSpeed's per-parameter hooks still fire inside the executor's ``torch.autograd.backward`` and copy each
  gradient into the reduction bucket as it is produced (reducing whenever the bucket fills). The end-of-backward
  step that DeepSpeed would run from its engine (reduce the last bucket, keep the partition, free the rest:
  ``overlapping_partition_gradients_reduce_epilogue``) runs from ``after_backward``, which the executor calls
  after every backward pass.
* A zero-bubble I leaves the linears' weight gradients to its W (``raymoe.parallel.weight_grad``), so their hooks
  fire with no gradient: those calls are skipped. The W writes ``.grad`` outside autograd, where no hook fires:
  ``after_backward`` hands every gradient the hooks did not see to the same reduction before the epilogue.
* Where it is valid (``raymoe.runtime.driver.validate_layout``): every schedule at ``parallel.pp=1``, and with a
  pipeline only where no parameter has a copy on another pipeline rank (DualPipeV; 1F1B, GPipe and ZB1P without
  MTP). The runtime sums such copies (DualPipe's mirrored stages, the embedding the MTP modules share with the
  first stage) after the last backward, when ZeRO-2 has already reduced and freed their gradients. The price with
  a pipeline: a dp reduction after every backward pass, M per step inside the schedule, where ZeRO-1 has one at
  the step (DeepSpeed's own ``PipelineEngine`` refuses stage 2 altogether).

The local twin ``LocalAdamW`` (dp = 1, or ``zero_stage`` 0) is plain torch AdamW with the same clipping: it does
not import DeepSpeed at all.

Set-up facts (measured on CPU + gloo inside Ray actors): DeepSpeed asserts on ``LOCAL_RANK`` (Ray does not set
it); its first communication set-up JIT-builds a shared-memory op (~60 s) used only for inference all-reduce,
skipped by emptying ``deepspeed.ops.__compatible_ops__``; ``deepspeed.initialize`` then takes ~2 s.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from raymoe.checkpoint.reshard import (
    adamw_shard_state,
    adamw_state_dict,
    check_kind,
    load_adamw_param_states,
    load_adamw_shard_state,
    position_names,
)
from raymoe.config import OptimConfig
from raymoe.fp8 import optimizer_state_bytes
from raymoe.train.clip import clip_coefficient, squared_norm
from raymoe.train.optim import make_adamw, set_lr


@dataclass(frozen=True, kw_only=True)
class OptimizerMemory:
    state_bytes: int
    """Adam moments (and step counters) this rank holds."""
    master_bytes: int
    """fp32 master weights the optimizer holds besides the model's own parameters (ZeRO's partition)."""
    grad_bytes: int = 0
    """Gradients held when the last step began, after all backward passes: every parameter's full ``.grad``
    (plain AdamW, ZeRO-1) or the accumulated partition (ZeRO-2: ~1/dp of the former)."""

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.master_bytes


class StageOptimizer(Protocol):
    def after_backward(self) -> None:
        """Called by the executor after every backward pass (B, I, W, an FB's backward) of a step."""
        ...

    def mean_gradients(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """dp-averaged gradients of ``params`` before clipping (parity checks); between the backward and ``step``."""
        ...

    def step(self, lr: float) -> float:
        """Reduce gradients over dp, clip by the global norm, update; returns the global norm before clipping."""
        ...

    def memory(self) -> OptimizerMemory: ...

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this rank's optimizer exactly (safe for ``weights_only`` loads)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Resharding: take this rank's part of full per-parameter AdamW states (``raymoe.checkpoint.reshard``),
        after the parameters themselves were loaded."""
        ...


def build_optimizer(
    module: nn.Module,
    optim: OptimConfig,
    *,
    zero_stage: int,
    dp_group,
    pp_group,
    not_in_norm: Collection[nn.Parameter] = (),
    micro_batch_size: int = 1,
    num_microbatches: int = 1,
    backend: str = "gloo",
    bf16_moments: bool = False,
) -> StageOptimizer:
    """DeepSpeed ZeRO when there is a dp group to partition over, else the plain-AdamW local twin."""
    if dp_group is None or zero_stage == 0:
        return LocalAdamW(
            module, optim, dp_group=dp_group, pp_group=pp_group, not_in_norm=not_in_norm, bf16_moments=bf16_moments
        )
    zero = DeepSpeedZero2 if zero_stage == 2 else DeepSpeedZero
    return zero(
        module, optim, zero_stage=zero_stage, dp_group=dp_group, pp_group=pp_group, not_in_norm=not_in_norm,
        micro_batch_size=micro_batch_size, num_microbatches=num_microbatches, backend=backend,
        bf16_moments=bf16_moments,
    )


# -- global norm and clipping (shared by both optimizers) ---------------------------------------------------------
def pipeline_norm(stage_sq: torch.Tensor, pp_group) -> torch.Tensor:
    """sqrt of the squared stage norms (float64, ``squared_norm``) summed over the pipeline group, in float64."""
    total_sq = stage_sq.detach().to(torch.float64).clone()
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    return total_sq.sqrt()


def replicated_mean_gradients(params: Sequence[nn.Parameter], dp_group) -> list[torch.Tensor]:
    """Copies of the full ``.grad`` of every parameter, averaged over ``dp_group`` (not yet reduced: ZeRO-0/1)."""
    from raymoe.parallel.groups import all_reduce_sum

    for p in params:
        if p.grad is None:  # a parameter no micro-batch reached: its gradient is zero
            p.grad = torch.zeros_like(p)
    grads = [p.grad.detach().clone() for p in params]
    all_reduce_sum(grads, dp_group)
    scale = 1.0 / (1 if dp_group is None else dist.get_world_size(dp_group))
    return [g * scale for g in grads]


def held_grad_bytes(params: Collection[nn.Parameter]) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def _adamw(module: nn.Module, optim: OptimConfig, bf16_moments: bool = False) -> torch.optim.Optimizer:
    # The reference's groups (decay matrices, not vectors) and hyper-parameters, so the update is the same;
    # ``bf16_moments`` is precision.bf16_optimizer_states (BF16 Adam moments, FP32 master weights).
    return make_adamw(module.named_parameters(), optim, bf16_moments=bf16_moments)


# -- the local twin --------------------------------------------------------------------------------------------
class LocalAdamW:
    """torch AdamW on this rank's parameters; gradients averaged over ``dp_group`` (if any) by all-reduce."""

    def __init__(
        self, module: nn.Module, optim: OptimConfig, *, dp_group, pp_group, not_in_norm=(), bf16_moments: bool = False
    ) -> None:
        self.optim = optim
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.dp_group = dp_group
        self.pp_group = pp_group
        skip = {id(p) for p in not_in_norm}
        self.norm_params = [p for p in self.params if id(p) not in skip]
        self.optimizer = _adamw(module, optim, bf16_moments)
        self.names = position_names(self.optimizer, module.named_parameters())
        self._grad_bytes = 0

    def after_backward(self) -> None:
        pass  # gradients stay on the parameters until the step

    def mean_gradients(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        return replicated_mean_gradients(params, self.dp_group)

    def step(self, lr: float) -> float:
        self._grad_bytes = held_grad_bytes(self.params)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.dp_group is not None:
            from raymoe.parallel.groups import all_reduce_sum

            all_reduce_sum(grads, self.dp_group)
            for g in grads:
                g.div_(dist.get_world_size(self.dp_group))
        device = self.params[0].device if self.params else "cpu"
        stage_sq = squared_norm((p.grad for p in self.norm_params if p.grad is not None), device=device)
        total = pipeline_norm(stage_sq, self.pp_group)
        if self.optim.grad_clip > 0:
            coef = clip_coefficient(total, self.optim.grad_clip)
            for g in grads:
                g.mul_(coef.to(g.device, g.dtype))
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)

    def memory(self) -> OptimizerMemory:
        return OptimizerMemory(
            state_bytes=optimizer_state_bytes(self.optimizer), master_bytes=0, grad_bytes=self._grad_bytes
        )

    def state_dict(self) -> dict:
        """AdamW's moments and step counts (tensors and plain containers: loadable with ``weights_only``)."""
        return adamw_shard_state(self.optimizer, self.names)

    def load_state_dict(self, state: dict) -> None:
        load_adamw_shard_state(self.optimizer, state)

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        load_adamw_param_states(self.optimizer, self.names, states)


# -- DeepSpeed ZeRO ----------------------------------------------------------------------------------------------
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
    ) -> None:
        deepspeed = import_deepspeed(backend)
        for p in not_in_norm:
            p.ds_pipe_replicated = True  # DeepSpeed's own flag: skipped by its norm
        ds_config = {
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
        self.engine, self.zero, _, _ = deepspeed.initialize(
            model=module, optimizer=_adamw(module, optim, bf16_moments), config=ds_config, mpu=_StageMpu(dp_group),
            dist_init_required=False,
        )
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._name_of = {id(p): n for n, p in module.named_parameters()}
        self.dp_group = dp_group
        self._grad_bytes = 0
        self._wrap_norm_and_clip(optim.grad_clip, dp_group, pp_group)

    def after_backward(self) -> None:
        pass  # ZeRO-1 reduces at the step

    def mean_gradients(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        return replicated_mean_gradients(params, self.dp_group)

    def _held_grad_bytes(self) -> int:
        return held_grad_bytes(self.params)

    def _wrap_norm_and_clip(self, max_norm: float, dp_group, pp_group) -> None:
        zero = self.zero
        # The override reads averaged_gradients: CPU offload keeps its gradients elsewhere, and DeepSpeed MoE groups
        # would need their norms averaged over their own groups. Neither is configured here; refuse, not mis-clip.
        if zero.has_moe_layers or zero.cpu_offload:
            raise NotImplementedError("the global-norm override handles neither DeepSpeed MoE parameter groups nor "
                                      f"CPU offload (has_moe_layers={zero.has_moe_layers}, "
                                      f"cpu_offload={zero.cpu_offload})")
        self._last_norm = torch.zeros((), dtype=torch.float64)

        def partition_grads():
            # What DeepSpeed's get_grad_norm_direct reads: this rank's slices of the dp-averaged gradients of each
            # group, padding skipped, paired with their parameters (so that replicas can be skipped).
            for i in range(len(zero.bit16_groups)):
                grads = (g for g in zero.averaged_gradients[i] if not getattr(g, "_zero_padding", False))
                for g, p in zip(grads, zero.params_in_partition[i]):
                    if not getattr(p, "ds_pipe_replicated", False):
                        yield g

        def global_norm(norm_type: int = 2) -> torch.Tensor:
            if norm_type != 2:
                raise ValueError(f"only the L2 gradient norm is supported, got norm_type={norm_type}")
            partition_sq = squared_norm(partition_grads(), device=zero.device)
            dist.all_reduce(partition_sq, group=dp_group)  # the stage's partitions
            self._last_norm = pipeline_norm(partition_sq, pp_group)
            return self._last_norm

        def clip(grad_groups_flat, total_norm) -> None:
            if max_norm > 0:
                coef = clip_coefficient(total_norm, max_norm)
                for g in grad_groups_flat:
                    g.mul_(coef.to(g.device, g.dtype))

        # Instance attributes shadow the optimizer's methods; step() calls them by name.
        self.zero.scaled_global_norm = global_norm
        self.zero.unscale_and_clip_grads = clip

    def step(self, lr: float) -> float:
        self._grad_bytes = self._held_grad_bytes()
        set_lr(self.zero.optimizer, lr)
        if not self.zero.partition_gradients:
            # ZeRO-1 sets up its reduction buffers from a gradient-accumulation hook. A zero-bubble W adds its
            # deferred weight gradients to .grad directly (raymoe.parallel.weight_grad), so on a stage whose every
            # backward was split that hook may never fire: set the buffers up here (a no-op when a hook already did).
            self.zero.setup_buckets()
        self.engine.step()
        return float(self._last_norm)

    def memory(self) -> OptimizerMemory:
        master = sum(t.numel() * t.element_size() for t in self.zero.single_partition_of_fp32_groups)
        return OptimizerMemory(
            state_bytes=optimizer_state_bytes(self.zero.optimizer), master_bytes=master, grad_bytes=self._grad_bytes
        )

    def state_dict(self) -> dict:
        """This rank's partition: its flat fp32 master weights and the AdamW state over them.

        Not DeepSpeed's own ``state_dict()``, which pickles DeepSpeed objects (its loss scaler) and could then only
        be read by unpickling arbitrary classes; the model's parameters are saved beside this, in the same shard.
        """
        return {
            "kind": "deepspeed-zero",
            "dp_rank": dist.get_rank(self.zero.dp_process_group),
            "dp_size": dist.get_world_size(self.zero.dp_process_group),
            "master": [t.detach().clone() for t in self.zero.single_partition_of_fp32_groups],
            "adamw": self.zero.optimizer.state_dict(),
            "slices": [[[self._name_of[id(p)], *where] for p, *where in group] for group in self._partition_slices()],
        }

    def _partition_slices(self) -> list[list[tuple[nn.Parameter, int, int, int]]]:
        """Per group: (param, start in this rank's flat partition, start in the flattened param, numel) for every
        parameter that overlaps the partition -- DeepSpeed's own mapping (``_hp_mapping``, None elsewhere)."""
        assert all(len(g["params"]) == 1 for g in self.zero.optimizer.param_groups), "one flat partition per group"
        slices = []
        for group in self.zero.bit16_groups:
            pieces = []
            for p in group:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None:
                    hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                    pieces.append((p, hp.start, lp.start, lp.numel))
            slices.append(pieces)
        return slices

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """The fp32 master partition from the (already loaded) parameters, and AdamW's state over it from
        ``states`` (created here if the optimizer never stepped; the padding's moments stay zero)."""
        from raymoe.checkpoint.reshard import flat_state

        slices = self._partition_slices()
        masters = self.zero.single_partition_of_fp32_groups
        with torch.no_grad():
            for master, pieces in zip(masters, slices):
                for p, part_start, param_start, numel in pieces:
                    master.narrow(0, part_start, numel).copy_(p.detach().reshape(-1).narrow(0, param_start, numel))
        by_position = {}
        for group, (master, pieces) in enumerate(zip(masters, slices)):
            named = [[self._name_of[id(p)], *where] for p, *where in pieces]
            flat = flat_state(master.numel(), named, states, source=f"ZeRO partition group {group}")
            if flat is not None:
                by_position[group] = flat
        if by_position:
            self.zero.optimizer.load_state_dict(adamw_state_dict(self.zero.optimizer, by_position))

    def load_state_dict(self, state: dict) -> None:
        check_kind(state, "deepspeed-zero")
        dp_size = dist.get_world_size(self.zero.dp_process_group)
        if state["dp_size"] != dp_size or state["dp_rank"] != dist.get_rank(self.zero.dp_process_group):
            raise ValueError(f"ZeRO partition {state['dp_rank']}/{state['dp_size']} cannot load into rank "
                             f"{dist.get_rank(self.zero.dp_process_group)}/{dp_size}")
        live = self.zero.single_partition_of_fp32_groups
        shapes = [tuple(t.shape) for t in state["master"]]
        if shapes != [tuple(t.shape) for t in live]:
            raise ValueError(f"ZeRO master partition shapes {shapes} != this rank's {[tuple(t.shape) for t in live]}")
        with torch.no_grad():
            for target, saved in zip(live, state["master"]):
                target.copy_(saved)
        self.zero.optimizer.load_state_dict(state["adamw"])


class DeepSpeedZero2(DeepSpeedZero):
    """ZeRO-2: gradients partitioned too, reduced after every backward pass (see the module docstring)."""

    def __init__(self, module: nn.Module, optim: OptimConfig, **kwargs) -> None:
        super().__init__(module, optim, **kwargs)
        self._handed: set[int] = set()  # ids of the parameters whose gradient this backward pass gave to ZeRO
        hook_body = self.zero.process_gradients

        def process_gradients(param: nn.Parameter, group: int) -> None:
            if self.zero.get_gradient_for_reduction(param) is None:
                return  # a zero-bubble I: this weight's gradient comes with its W
            self._handed.add(id(param))
            hook_body(param, group)

        # DeepSpeed's gradient hooks call the optimizer's process_gradients by name; the instance attribute wins.
        self.zero.process_gradients = process_gradients
        self._mirror_boundary()

    def _mirror_boundary(self) -> None:
        # What the engine's backward prologue does: the optimizer's copy of "is this the accumulation boundary",
        # False between steps (caller-owned accumulation), so each epilogue *adds* to the accumulated partition.
        # engine.step() sets it True while it finalizes the partition and steps.
        self.zero.set_gradient_accumulation_boundary(self.engine.is_gradient_accumulation_boundary())

    def step(self, lr: float) -> float:
        norm = super().step(lr)
        self._mirror_boundary()
        return norm

    def after_backward(self) -> None:
        # What the hooks did not see was written outside autograd (a W): hand it over in DeepSpeed's group order,
        # which is the same on every dp rank, so the reduction buckets line up.
        for group, params in enumerate(self.zero.bit16_groups):
            for p in params:
                if id(p) not in self._handed and self.zero.get_gradient_for_reduction(p) is not None:
                    self.zero.process_gradients(p, group)
        if self._handed:  # reduce the last bucket, keep this rank's partition, free every full gradient
            self.zero.overlapping_partition_gradients_reduce_epilogue()
        self._handed.clear()

    def mean_gradients(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """Every rank contributes the slice of each parameter it owns (zeros elsewhere); one sum assembles them."""
        from raymoe.parallel.groups import all_reduce_sum

        owned = self._accumulated()
        full = []
        for p in params:
            flat = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            if id(p) in owned:
                fragment = p._hp_mapping.lp_fragment_address  # this rank's slice of p, set by DeepSpeed
                source = owned[id(p)].reshape(-1).narrow(0, fragment.start, fragment.numel)
                flat.narrow(0, fragment.start, fragment.numel).copy_(source)
            full.append(flat)
        all_reduce_sum(full, self.dp_group)
        return [g.view_as(p).to(p.dtype) for g, p in zip(full, params)]

    def _accumulated(self) -> dict[int, torch.Tensor]:
        """id(param) -> the dp-averaged gradient accumulated over this step, for the parameters of this rank's
        partition (full-size tensors of which only the rank's own slice is meaningful)."""
        owned = {}
        for group, params in enumerate(self.zero.params_in_partition):
            grads = self.zero.all_grad_tensors.get(group)
            if grads is not None:
                owned.update((id(p), g) for p, g in zip(params, grads))
        return owned

    def _held_grad_bytes(self) -> int:
        return held_grad_bytes(self.params) + sum(g.numel() * g.element_size() for g in self._accumulated().values())
