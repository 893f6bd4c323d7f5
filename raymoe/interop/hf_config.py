"""Our ``Config`` <-> a Hugging Face DeepSeek-V3 ``config.json``.

One table (``FIELDS``) says which of our fields is which of theirs; export writes it, import checks it. The
conventions that need converting (see docs/interop.md):
  * ``q_lora_rank: 0`` (queries projected directly) is ``null`` there;
  * their group-limited routing scores a group by its top-2 biased affinities, ours by its top-(top_k /
    groups_kept) (the paper's wording); identical when that ratio is 2, so other ratios are refused;
  * their ``q_a_layernorm`` / ``kv_a_layernorm`` always use eps 1e-6, ours ``model.norm_eps``: other values refused;
  * softmax gates (DeepSeek-V2) are not DeepSeek-V3: refused.
"""

from __future__ import annotations

from raymoe.config import Config
from raymoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

FIELDS = (
    ("model.vocab_size", "vocab_size"),
    ("model.dim", "hidden_size"),
    ("model.num_layers", "num_hidden_layers"),
    ("model.num_dense_layers", "first_k_dense_replace"),
    ("model.dense_inter_dim", "intermediate_size"),
    ("model.moe_inter_dim", "moe_intermediate_size"),
    ("model.num_routed_experts", "n_routed_experts"),
    ("model.num_shared_experts", "n_shared_experts"),
    ("model.num_heads", "num_attention_heads"),
    ("model.q_lora_rank", "q_lora_rank"),
    ("model.kv_lora_rank", "kv_lora_rank"),
    ("model.qk_nope_head_dim", "qk_nope_head_dim"),
    ("model.qk_rope_head_dim", "qk_rope_head_dim"),
    ("model.v_head_dim", "v_head_dim"),
    ("model.max_seq_len", "max_position_embeddings"),
    ("model.rope_theta", "rope_theta"),
    ("model.norm_eps", "rms_norm_eps"),
    ("routing.top_k", "num_experts_per_tok"),
    ("routing.num_groups", "n_group"),
    ("routing.groups_kept", "topk_group"),
    ("routing.route_scale", "routed_scaling_factor"),
)
"""(our dotted field, config.json key) for every field that changes the function the model computes."""

HF_NORM_EPS = 1e-6
"""transformers builds q_a_layernorm and kv_a_layernorm with this eps whatever rms_norm_eps says."""


def _ours(config: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def check_exportable(config: Config) -> None:
    """ValueError naming the values where ``config``'s model is not a DeepSeek-V3 that transformers computes."""
    r, m = config.routing, config.model
    if r.score_func != "sigmoid":
        raise ValueError(f"routing.score_func={r.score_func!r}: the DeepSeek-V3 format gates with sigmoid only")
    if r.num_groups > 1 and r.top_k // r.groups_kept != 2:
        raise ValueError(
            f"routing.top_k/groups_kept = {r.top_k}/{r.groups_kept}: transformers scores an expert group by its top-2 "
            f"experts, we by the top-(top_k/groups_kept); they agree only when that ratio is 2"
        )
    if r.num_groups == 1 and m.num_routed_experts < 2:
        raise ValueError("model.num_routed_experts=1: transformers' router needs at least 2 experts per group")
    if m.norm_eps != HF_NORM_EPS:
        raise ValueError(f"model.norm_eps={m.norm_eps}: transformers' q_a/kv_a norms always use {HF_NORM_EPS}")


def hf_config(config: Config, *, dtype: str = "float32") -> dict:
    """The ``config.json`` of ``config``'s model (DeepSeek-V3 fields; the released model's names and values)."""
    check_exportable(config)
    values = {hf: _ours(config, dotted) for dotted, hf in FIELDS}
    values["q_lora_rank"] = values["q_lora_rank"] or None
    rope_theta = values.pop("rope_theta")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **values,
        "num_key_value_heads": config.model.num_heads,
        "num_nextn_predict_layers": config.mtp.depth,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "rope_theta": rope_theta,  # older readers (vLLM, transformers 4.x) look here
        "rope_interleave": True,  # our RoPE rotates adjacent channel pairs, as the released weights expect
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.model.init_std,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "dtype": dtype,
    }


def hf_value(hf: dict, key: str):
    """A config.json value, with the two places rope_theta lives and q_lora_rank null -> 0."""
    if key == "rope_theta":
        return (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    if key == "q_lora_rank":
        return hf.get("q_lora_rank") or 0
    if key == "num_nextn_predict_layers":
        return hf.get(key, hf.get("num_mtp_layers", 0)) or 0
    return hf.get(key)


def check_importable(hf: dict, *, source: str) -> None:
    """ValueError if ``hf`` describes a model we do not compute (YaRN, half-split RoPE, softmax gates...)."""
    if hf.get("model_type") not in ("deepseek_v3", None):
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not deepseek_v3")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    problems = {
        "rope_type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "rope_interleave": (hf.get("rope_interleave", True), True),
        "scoring_func": (hf.get("scoring_func", "sigmoid"), "sigmoid"),
        "norm_topk_prob": (hf.get("norm_topk_prob", True), True),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
        "num_key_value_heads": (hf.get("num_key_value_heads") or hf.get("num_attention_heads"),
                                hf.get("num_attention_heads")),
        "rms_norm_eps": (hf.get("rms_norm_eps", HF_NORM_EPS), HF_NORM_EPS),
    }
    bad = {k: got for k, (got, want) in problems.items() if got != want}
    if bad:
        raise ValueError(f"{source}: config.json has {bad}, which raymoe's DeepSeek-V3 does not compute")


def overrides_from_hf(hf: dict) -> list[str]:
    """``key=value`` overrides that make our config the model ``hf`` describes (plus ``mtp.depth``)."""
    out = [f"{dotted}={hf_value(hf, key)}" for dotted, key in FIELDS]
    return out + [f"mtp.depth={hf_value(hf, 'num_nextn_predict_layers')}"]


def check_matches(hf: dict, config: Config, *, source: str) -> None:
    """ValueError listing every field where ``config`` and the model of ``hf`` differ, with the overrides to use."""
    check_importable(hf, source=source)
    diffs = [(dotted, _ours(config, dotted), hf_value(hf, key)) for dotted, key in FIELDS
             if _ours(config, dotted) != hf_value(hf, key)]
    r = config.routing
    if hf_value(hf, "n_group") not in (None, 1) and r.top_k // r.groups_kept != 2:
        diffs.append(("routing.top_k/groups_kept", f"{r.top_k}/{r.groups_kept}", "a ratio of 2 (top-2 group score)"))
    if diffs:
        listed = ", ".join(f"{d}={ours!r} but the directory has {theirs!r}" for d, ours, theirs in diffs)
        fix = " ".join(f"{d}={theirs}" for d, _, theirs in diffs if "/" not in d)
        raise ValueError(f"{source} is another model: {listed}; add the overrides: {fix}")
