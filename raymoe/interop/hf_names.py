"""Parameter names: ours (``layers.3.ffn.experts.5.w1.weight``) <-> the Hugging Face DeepSeek-V3 checkpoint's
(``model.layers.3.mlp.experts.5.gate_proj.weight``), the layout of the released weights and of
``save_pretrained`` (transformers stacks experts into ``gate_up_proj`` in memory, per-expert on disk).

Routed experts keep their GLOBAL id on both sides. MTP module k lives where the released DeepSeek-V3 keeps it, as
layer ``num_layers + k``: its block under the usual block names, plus ``enorm``, ``hnorm``, ``eh_proj`` and
``shared_head.norm`` (and copies of the shared ``embed_tokens`` / ``shared_head.head``). transformers'
``DeepseekV3ForCausalLM`` has no MTP module and ignores (reports) those tensors; vLLM and SGLang read them.

The one tensor that changes, not just its name: the MTP projection. Ours reads ``[RMSNorm(h); RMSNorm(emb)]`` as
in the paper, the released weights ``[enorm(emb); hnorm(h)]``, so the two column halves of ``eh_proj`` swap.
"""

from __future__ import annotations

import re

import torch

_BLOCK = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wkv_a.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn.wkv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"),
)
_BLOCK_NAMES = dict(_BLOCK)
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MTP_OWN = {"hnorm.weight": "hnorm.weight", "enorm.weight": "enorm.weight", "proj.weight": "eh_proj.weight",
            "norm.weight": "shared_head.norm.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}


def _block_name(rest: str) -> str:
    if rest in _BLOCK_NAMES:
        return _BLOCK_NAMES[rest]
    if m := re.fullmatch(r"ffn\.(w[123])\.weight", rest):  # a dense layer's FFN
        return f"mlp.{_MLP[m[1]]}.weight"
    if m := re.fullmatch(r"ffn\.experts\.(\d+)\.(w[123])\.weight", rest):
        return f"mlp.experts.{m[1]}.{_MLP[m[2]]}.weight"
    if m := re.fullmatch(r"ffn\.shared\.(w[123])\.weight", rest):
        return f"mlp.shared_experts.{_MLP[m[1]]}.weight"
    raise ValueError(f"no Hugging Face name for block parameter {rest!r}")


def hf_name(name: str, num_layers: int) -> str:
    """The checkpoint name of our parameter ``name`` in a model of ``num_layers`` main layers."""
    if name in _TOP:
        return _TOP[name]
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
        return f"model.layers.{m[1]}.{_block_name(m[2])}"
    if m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
        prefix = f"model.layers.{num_layers + int(m[1])}"
        if m[2] in _MTP_OWN:
            return f"{prefix}.{_MTP_OWN[m[2]]}"
        if block := re.fullmatch(r"block\.(.+)", m[2]):
            return f"{prefix}.{_block_name(block[1])}"
    raise ValueError(f"no Hugging Face name for parameter {name!r}")


def bias_name(layer_id: int) -> str:
    """Where router ``layer_id``'s balancing bias lives (our routing-state row of that layer)."""
    return f"model.layers.{layer_id}.mlp.gate.e_score_correction_bias"


def is_mtp_projection(name: str) -> bool:
    return re.fullmatch(r"mtp\.\d+\.proj\.weight", name) is not None


def swap_halves(weight_DD2: torch.Tensor) -> torch.Tensor:
    """[h; emb] input columns <-> [emb; h] (its own inverse)."""
    first, second = weight_DD2.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)


def to_hf(name: str, tensor: torch.Tensor, num_layers: int) -> tuple[str, torch.Tensor]:
    return hf_name(name, num_layers), swap_halves(tensor) if is_mtp_projection(name) else tensor
