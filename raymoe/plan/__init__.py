"""The planner: analytic parameter counts and per-device memory of a model and parallel layout.

``count_params`` answers "how big is this model, and how much of it does a token use"; ``plan_memory``
answers "what does each device hold under pp x ep x dp with ZeRO"; ``plan_step`` answers "with activations,
does it fit, how long is a step, how many GPU-hours": per-chunk FLOPs, bytes and all-to-all traffic on a device
from ``DEVICES``, through the same schedule simulator the runtime's action lists are checked with. All of it is
arithmetic on the config, so it works for the 671B preset on a laptop. ``python -m raymoe plan`` prints them
(docs/plan.md).
"""

from raymoe.plan.assumptions import Assumptions
from raymoe.plan.destinations import Destinations, expected_destinations
from raymoe.plan.devices import DEVICES, DeviceSpec, device_spec
from raymoe.plan.memory import BytesPerElement, DeviceMemory, Layout, MemoryPlan, plan_memory, split_layers
from raymoe.plan.params import LayerParams, ModelParams, MtpParams, attention_params, count_params
from raymoe.plan.step import StepPlan, plan_step

__all__ = [
    "DEVICES",
    "Assumptions",
    "BytesPerElement",
    "Destinations",
    "DeviceSpec",
    "DeviceMemory",
    "LayerParams",
    "Layout",
    "MemoryPlan",
    "ModelParams",
    "MtpParams",
    "StepPlan",
    "attention_params",
    "count_params",
    "device_spec",
    "expected_destinations",
    "plan_memory",
    "plan_step",
    "split_layers",
]
