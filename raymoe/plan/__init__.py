"""The planner: analytic parameter counts and per-device memory of a model and parallel layout.

``count_params`` answers "how big is this model, and how much of it does a token use"; ``plan_memory``
answers "what does each device hold under pp x ep x dp with ZeRO". Both are arithmetic on the config, so
they work for the 671B preset on a laptop. ``python -m raymoe plan`` prints them.
"""

from raymoe.plan.memory import BytesPerElement, DeviceMemory, Layout, MemoryPlan, plan_memory, split_layers
from raymoe.plan.params import LayerParams, ModelParams, MtpParams, attention_params, count_params

__all__ = [
    "BytesPerElement",
    "DeviceMemory",
    "LayerParams",
    "Layout",
    "MemoryPlan",
    "ModelParams",
    "MtpParams",
    "attention_params",
    "count_params",
    "plan_memory",
    "split_layers",
]
