"""Who owns the optimizer state: DeepSpeed ZeRO around torch AdamW, or its local twin.

``build_optimizer`` picks, per worker: ``LocalAdamW`` (``local.py``: plain torch AdamW, dp = 1 or
``zero_stage=0``; never imports DeepSpeed), ``DeepSpeedZero`` (``deepspeed_zero.py``: ZeRO-1, the stage
DeepSeek-V3 ran with its pipeline; the only module that imports deepspeed) or ``DeepSpeedZero2``
(``deepspeed_zero2.py``: gradients partitioned too). All three clip by the same pipeline-wide norm and report
their memory alike (``common.py``). Importing this package imports neither Ray nor DeepSpeed: DeepSpeed is
imported when a ZeRO optimizer is built.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from raymoe.config import OptimConfig
from raymoe.zero.common import ExpertSplit, OptimizerMemory, StageOptimizer, pipeline_norm
from raymoe.zero.deepspeed_zero import DeepSpeedZero, import_deepspeed
from raymoe.zero.deepspeed_zero2 import DeepSpeedZero2
from raymoe.zero.local import LocalAdamW

__all__ = [
    "DeepSpeedZero",
    "DeepSpeedZero2",
    "LocalAdamW",
    "OptimizerMemory",
    "StageOptimizer",
    "build_optimizer",
    "import_deepspeed",
    "pipeline_norm",
]


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
    expert_params: Collection[nn.Parameter] = (),
    ep_group=None,
    edp_group=None,
) -> StageOptimizer:
    """DeepSpeed ZeRO when there is a dp group to partition over, else the plain-AdamW local twin.

    ``expert_params``: this rank's routed-expert shard under expert parallelism (empty otherwise); they reduce over
    ``edp_group`` and count once in the norm over ``ep_group`` (``ExpertSplit``)."""
    experts = ExpertSplit.of(expert_params, ep_group=ep_group, edp_group=edp_group, dp_group=dp_group)
    if dp_group is None or zero_stage == 0:
        return LocalAdamW(
            module, optim, dp_group=dp_group, pp_group=pp_group, not_in_norm=not_in_norm, bf16_moments=bf16_moments,
            experts=experts,
        )
    if experts is not None and zero_stage == 2:
        raise ValueError("parallel.zero_stage=2 with parallel.ep > 1 is not supported; use parallel.zero_stage=1")
    zero = DeepSpeedZero2 if zero_stage == 2 else DeepSpeedZero
    return zero(
        module, optim, zero_stage=zero_stage, dp_group=dp_group, pp_group=pp_group, not_in_norm=not_in_norm,
        micro_batch_size=micro_batch_size, num_microbatches=num_microbatches, backend=backend,
        bf16_moments=bf16_moments, **({"experts": experts} if experts is not None else {}),
    )
