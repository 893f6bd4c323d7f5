"""Activation memory: what each block keeps for its backward pass, per token, and the live peak per rank.

An inventory of the tensors autograd saves, block by block (the list below is the whole model). Each is tagged by
what it is, which fixes its bytes:

  * ``act``  -- in the compute dtype (BF16: 2 bytes, FP32: 4);
  * ``fp32`` -- kept in FP32 whatever the dtype (the attention log-sum-exp, the router's affinities);
  * ``lin``  -- the input of a linear DeepSeek-V3 runs in FP8: with ``precision.fp8`` cached in FP8 with one FP32
    scale per 1x128 tile (1 + 4/128 bytes), as the paper caches it (section 3.3.2); else ``act``;
  * ``wo``   -- the attention output, the input of ``wo``: the paper caches it in its E5M6 format (12 bits).

``recompute=True`` drops what the paper recomputes in the backward (section 3.3.3 and 3.3.2): every RMSNorm output,
the MLA up-projections' outputs (q, k, v rebuilt from the cached latents) and the SwiGLU outputs (rebuilt from the
cached SwiGLU inputs). The flag ``recomputed`` on each entry marks those.

Routed experts: rank r computes its experts on the rows it *receives*; with balanced routing that is top_k rows per
token of its own micro-batch (dropless, ``tokens * K`` rows over ``ep`` ranks each holding ``E/ep`` experts).

The cross-entropy of the output head is assumed fused (logits produced and consumed chunk by chunk, as fused
linear-cross-entropy kernels do); ``keep_logits=True`` keeps the V logits per token instead.

``peak_live_bytes`` is the simulator's ``peak_live`` weighted by each stage's bytes: the same walk (F adds a stage
micro-batch, B or I frees it), so with equal stages it is ``peak_live x`` one stage's bytes.

Legend: as in ``raymoe.plan.flops``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from raymoe.config import ModelConfig
from raymoe.schedule.action import Action, Kind

FP8_TILE_BYTES = 1 + 4 / 128  # an E4M3 element plus its share of one fp32 scale per 1x128 tile
E5M6_BYTES = 1.5


@dataclass(frozen=True, kw_only=True)
class Saved:
    name: str
    elems: float
    """Elements per token."""
    kind: str
    """act, fp32, lin or wo (module docstring)."""
    recomputed: bool = False

    def bytes(self, *, act_bytes: int, fp8: bool) -> float:
        per = {"act": act_bytes, "fp32": 4, "lin": FP8_TILE_BYTES if fp8 else act_bytes,
               "wo": E5M6_BYTES if fp8 else act_bytes}[self.kind]
        return self.elems * per


def attention_saved(cfg: ModelConfig) -> list[Saved]:
    d, h = cfg.dim, cfg.num_heads
    dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    saved = [Saved(name="attn_norm.in", elems=d, kind="act"),
             Saved(name="attn_norm.out", elems=d, kind="lin", recomputed=True)]
    if cfg.q_lora_rank > 0:
        saved += [Saved(name="q_latent", elems=cfg.q_lora_rank, kind="act"),
                  Saved(name="q_norm.out", elems=cfg.q_lora_rank, kind="lin", recomputed=True)]
    saved += [Saved(name="kv_latent+k_rope", elems=cfg.kv_lora_rank + cfg.qk_rope_head_dim, kind="act"),
              Saved(name="kv_norm.out", elems=cfg.kv_lora_rank, kind="lin", recomputed=True),
              Saved(name="q", elems=h * dqk, kind="act", recomputed=True),
              Saved(name="k", elems=h * dqk, kind="act", recomputed=True),
              Saved(name="v", elems=h * cfg.v_head_dim, kind="act", recomputed=True),
              Saved(name="attn.out", elems=h * cfg.v_head_dim, kind="wo"),
              Saved(name="attn.lse", elems=h, kind="fp32")]
    return saved


def ffn_saved(cfg: ModelConfig, *, moe: bool, top_k: int, gate_weight_in_expert: bool = True) -> list[Saved]:
    d = cfg.dim
    saved = [Saved(name="ffn_norm.in", elems=d, kind="act"),
             Saved(name="ffn_norm.out", elems=d, kind="lin", recomputed=True)]
    if not moe:
        i = cfg.dense_inter_dim
        return saved + [Saved(name="ffn.swiglu_in", elems=2 * i, kind="lin"),
                        Saved(name="ffn.swiglu_out", elems=i, kind="lin", recomputed=True)]
    i, shared = cfg.moe_inter_dim, cfg.num_shared_experts * cfg.moe_inter_dim
    saved.append(Saved(name="gate.affinities", elems=cfg.num_routed_experts, kind="fp32"))
    if shared:
        saved += [Saved(name="shared.swiglu_in", elems=2 * shared, kind="lin"),
                  Saved(name="shared.swiglu_out", elems=shared, kind="lin", recomputed=True)]
    # Per received row (K per token): the dispatched input, the SwiGLU input and output. The gate weight's
    # gradient is <dL/dy, expert_out>: either the expert's D-wide output is kept for it, or the weight multiplies
    # the SwiGLU output inside the expert and the gradient reads that (recomputable) I-wide tensor instead.
    saved += [Saved(name="experts.in", elems=top_k * d, kind="lin"),
              Saved(name="experts.swiglu_in", elems=top_k * 2 * i, kind="lin"),
              Saved(name="experts.swiglu_out", elems=top_k * i, kind="lin", recomputed=True)]
    if not gate_weight_in_expert:
        saved.append(Saved(name="experts.out", elems=top_k * d, kind="act"))
    return saved


def head_saved(cfg: ModelConfig, *, keep_logits: bool) -> list[Saved]:
    saved = [Saved(name="final_norm.in", elems=cfg.dim, kind="act"),
             Saved(name="final_norm.out", elems=cfg.dim, kind="act", recomputed=True)]
    if keep_logits:
        saved.append(Saved(name="logits", elems=cfg.vocab_size, kind="act"))
    return saved


def mtp_input_saved(cfg: ModelConfig) -> list[Saved]:
    """An MTP module before its block: the token embedding, and the two norms' outputs the projection reads."""
    return [Saved(name="mtp.embedding", elems=cfg.dim, kind="act"),
            Saved(name="mtp.norms.out", elems=2 * cfg.dim, kind="act", recomputed=True)]


def saved_bytes(saved: Iterable[Saved], *, act_bytes: int, fp8: bool, recompute: bool) -> float:
    """Bytes per token of ``saved``; ``recompute`` leaves out what the paper recomputes."""
    return sum(s.bytes(act_bytes=act_bytes, fp8=fp8) for s in saved if not (recompute and s.recomputed))


def peak_live_bytes(actions: Iterable[Action], bytes_of_stage: Callable[[int], float] | Mapping[int, float]) -> float:
    """Most activation bytes one rank holds at once over its compute ``actions`` (module docstring)."""
    size = bytes_of_stage if callable(bytes_of_stage) else bytes_of_stage.__getitem__
    live = peak = 0.0
    for a in actions:
        for part in a.parts():
            if part.kind is Kind.F:
                live += size(part.stage)
                peak = max(peak, live)
            elif part.kind in (Kind.B, Kind.I):
                live -= size(part.stage)
    return peak
