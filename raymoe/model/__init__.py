"""Single-device DeepSeek-V3 math. Never reads a rank, never calls a collective."""

from raymoe.model.block import Block
from raymoe.model.build import build_model, materialize, parameter_seed
from raymoe.model.layers import MLP, RMSNorm, Rope, apply_rope
from raymoe.model.mla import MLA
from raymoe.model.moe import Gate, MoE, RouterStats, run_routed_experts
from raymoe.model.mtp import MTPModule
from raymoe.model.transformer import (
    ModelOutput,
    Transformer,
    output_losses,
    positions_trained,
    router_slots,
    set_gate_biases,
)

__all__ = [
    "MLA",
    "MLP",
    "Block",
    "Gate",
    "ModelOutput",
    "MoE",
    "MTPModule",
    "RMSNorm",
    "Rope",
    "RouterStats",
    "Transformer",
    "apply_rope",
    "build_model",
    "materialize",
    "parameter_seed",
    "output_losses",
    "positions_trained",
    "router_slots",
    "run_routed_experts",
    "set_gate_biases",
]
