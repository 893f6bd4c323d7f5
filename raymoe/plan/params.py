"""Analytic parameter counts of the DeepSeek-V3 model family, from a ``ModelConfig`` alone.

Nothing is allocated: every count is a product of config fields, so the 671B preset is counted in microseconds
and the numbers can be checked against the real ``nn.Module`` on small presets (``tests/test_plan.py``).

What is counted, and how (the conventions behind the published figures, see ``docs/plan.md``):
  * **total** -- every trainable parameter of the main model: embedding, all transformer layers, final norm
    and the (untied) output head. MTP modules are *not* included; DeepSeek-V3's 671B excludes them too.
  * **active** -- the parameters one token's forward pass multiplies with: every layer's attention, norms,
    dense FFN / shared experts and gate, only ``top_k`` of the routed experts, the final norm and the output
    head. The embedding table contributes the one row a token looks up (``dim`` elements), not the whole
    table: the convention that reproduces DeepSeek-V2-Lite's 2.4B, V2's 21B and V3's 37B together.
  * **mtp** -- what the MTP modules own: input norms, projection, transformer block and final norm. The
    embedding and output head are shared with the main model, so they are not counted again.
  * The aux-loss-free balancing bias of each gate is a *buffer* (routing state the driver writes, never
    learned): it is reported as ``routing_bias_elems`` and left out of every parameter count.

Legend: D model dim, H heads, V vocabulary, E routed experts, K experts per token (top_k), I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raymoe.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class LayerParams:
    """Parameter counts of one transformer block (a main-model layer or an MTP module's block)."""

    index: int
    """Layer id in the main model; MTP block k gets ``num_layers + k - 1`` (as in DeepSeek's checkpoints)."""
    kind: str
    """``dense`` (SwiGLU FFN) or ``moe`` (gate + shared + routed experts)."""
    attention: dict[str, int]
    """MLA matrices and latent norms by name (wq_a, q_norm, wq_b or wq, wkv_a, kv_norm, wkv_b, wo)."""
    norms: int
    """attn_norm + ffn_norm."""
    dense_ffn: int = 0
    gate: int = 0
    """Router weight (E x D); the balancing bias is a buffer and not counted."""
    shared_experts: int = 0
    routed_experts: int = 0
    """All E routed experts; these are the parameters expert parallelism splits."""
    routed_active: int = 0
    """The ``top_k`` routed experts one token uses."""
    routing_bias_elems: int = 0

    @property
    def attention_total(self) -> int:
        return sum(self.attention.values())

    @property
    def total(self) -> int:
        return (
            self.attention_total
            + self.norms
            + self.dense_ffn
            + self.gate
            + self.shared_experts
            + self.routed_experts
        )

    @property
    def active(self) -> int:
        return self.total - self.routed_experts + self.routed_active

    @property
    def non_expert(self) -> int:
        """Parameters replicated on every expert-parallel rank (everything but the routed experts)."""
        return self.total - self.routed_experts

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "kind": self.kind,
            "attention": self.attention_total,
            "attention_detail": dict(self.attention),
            "norms": self.norms,
            "dense_ffn": self.dense_ffn,
            "gate": self.gate,
            "shared_experts": self.shared_experts,
            "routed_experts": self.routed_experts,
            "routing_bias_elems": self.routing_bias_elems,
            "total": self.total,
            "active": self.active,
        }


@dataclass(frozen=True, kw_only=True)
class MtpParams:
    """One MTP module: proj([hnorm(h); enorm(Emb(t))]), a block, a final norm; embedding and head shared."""

    depth: int
    """1-based prediction depth k."""
    norms: int
    """hnorm + enorm + the final norm before the shared head."""
    proj: int
    block: LayerParams

    @property
    def total(self) -> int:
        return self.norms + self.proj + self.block.total

    @property
    def active(self) -> int:
        return self.norms + self.proj + self.block.active

    def as_dict(self) -> dict[str, object]:
        return {
            "depth": self.depth,
            "norms": self.norms,
            "proj": self.proj,
            "block": self.block.as_dict(),
            "total": self.total,
            "active": self.active,
        }


@dataclass(frozen=True, kw_only=True)
class ModelParams:
    """The whole model's counts; ``total``/``active``/``mtp_total`` are the headline figures."""

    dim: int
    embedding: int
    layers: tuple[LayerParams, ...]
    final_norm: int
    head: int
    mtp: tuple[MtpParams, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return self.embedding + sum(layer.total for layer in self.layers) + self.final_norm + self.head

    @property
    def active(self) -> int:
        # One embedding row per token (see the module docstring for why not the whole table).
        return self.dim + sum(layer.active for layer in self.layers) + self.final_norm + self.head

    @property
    def active_with_embedding(self) -> int:
        """Active count with the whole embedding table, the convention of DeepSeek's README_WEIGHTS.md."""
        return self.active - self.dim + self.embedding

    @property
    def mtp_total(self) -> int:
        return sum(module.total for module in self.mtp)

    @property
    def mtp_active(self) -> int:
        return sum(module.active for module in self.mtp)

    @property
    def routing_bias_elems(self) -> int:
        return sum(layer.routing_bias_elems for layer in self.layers) + sum(
            module.block.routing_bias_elems for module in self.mtp
        )


def attention_params(cfg: ModelConfig) -> dict[str, int]:
    """MLA projections: queries through a rank-Cq bottleneck (or directly when q_lora_rank == 0), keys and
    values from one rank-Ckv latent plus a shared RoPE key, and the output projection."""
    heads = cfg.num_heads
    counts: dict[str, int] = {}
    if cfg.q_lora_rank > 0:
        counts["wq_a"] = cfg.dim * cfg.q_lora_rank
        counts["q_norm"] = cfg.q_lora_rank
        counts["wq_b"] = cfg.q_lora_rank * heads * cfg.qk_head_dim
    else:
        counts["wq"] = cfg.dim * heads * cfg.qk_head_dim
    counts["wkv_a"] = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    counts["kv_norm"] = cfg.kv_lora_rank
    counts["wkv_b"] = cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    counts["wo"] = heads * cfg.v_head_dim * cfg.dim
    return counts


def swiglu_params(dim: int, inter_dim: int) -> int:
    """w1, w3 (D -> I) and w2 (I -> D)."""
    return 3 * dim * inter_dim


def layer_params(cfg: ModelConfig, index: int, *, top_k: int, moe: bool) -> LayerParams:
    common = {"index": index, "attention": attention_params(cfg), "norms": 2 * cfg.dim}
    if not moe:
        return LayerParams(kind="dense", dense_ffn=swiglu_params(cfg.dim, cfg.dense_inter_dim), **common)
    expert = swiglu_params(cfg.dim, cfg.moe_inter_dim)
    return LayerParams(
        kind="moe",
        gate=cfg.num_routed_experts * cfg.dim,
        # The shared experts run as one SwiGLU of width num_shared * I: the count of num_shared separate ones.
        shared_experts=cfg.num_shared_experts * expert,
        routed_experts=cfg.num_routed_experts * expert,
        routed_active=top_k * expert,
        routing_bias_elems=cfg.num_routed_experts,
        **common,
    )


def count_params(cfg: ModelConfig, *, top_k: int, mtp_depth: int = 0) -> ModelParams:
    """Count a model of shape ``cfg`` routing ``top_k`` experts per token, with ``mtp_depth`` MTP modules."""
    if not 0 < top_k <= cfg.num_routed_experts:
        raise ValueError(
            f"top_k must be in [1, model.num_routed_experts={cfg.num_routed_experts}], got {top_k}"
        )
    if mtp_depth < 0:
        raise ValueError(f"mtp_depth must be >= 0, got {mtp_depth}")
    layers = tuple(layer_params(cfg, i, top_k=top_k, moe=cfg.is_moe_layer(i)) for i in range(cfg.num_layers))
    # Every MTP block is a MoE block, like DeepSeek-V3's layer 61 (and raymoe.model.mtp.MTPModule).
    mtp = tuple(
        MtpParams(
            depth=k,
            norms=3 * cfg.dim,
            proj=2 * cfg.dim * cfg.dim,
            block=layer_params(cfg, cfg.num_layers + k - 1, top_k=top_k, moe=True),
        )
        for k in range(1, mtp_depth + 1)
    )
    embedding = cfg.vocab_size * cfg.dim
    return ModelParams(
        dim=cfg.dim, embedding=embedding, layers=layers, final_norm=cfg.dim, head=embedding, mtp=mtp
    )
