"""ZeRO stage 2 (``DeepSpeedZero2``) also partitions the *gradients*: after every backward pass (each micro-batch's
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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raymoe.config import OptimConfig
from raymoe.zero.common import held_grad_bytes
from raymoe.zero.deepspeed_zero import DeepSpeedZero


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
