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

from raymoe.checkpoint.reshard import adamw_state_dict, check_kind
from raymoe.config import OptimConfig
from raymoe.fp8 import optimizer_state_bytes
from raymoe.train.clip import clip_coefficient, squared_norm
from raymoe.train.optim import set_lr
from raymoe.zero.common import (
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
            model=module, optimizer=stage_adamw(module, optim, bf16_moments), config=ds_config, mpu=_StageMpu(dp_group),
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
