"""The arithmetic of one token through each block: every GEMM, the attention core, the memory-bound rest.

Counts are per token of a micro-batch, forward pass, in FLOPs (a multiply-add is 2); ``raymoe.plan.step_cost``
turns them into seconds with the device table. Backward conventions (the usual ones, stated once here):

  * a GEMM's backward is its input gradient (dgrad) plus its weight gradient (wgrad), each the forward's FLOPs,
    so B = 2 F and the zero-bubble W (wgrad alone) = F;
  * the attention core (QK^T, PV) has no weights; its backward recomputes QK^T and computes dQ, dK, dV, dP
    (FlashAttention): 5 products against the forward's 2, i.e. 2.5x;
  * with the paper's recomputation (DeepSeek-V3 section 3.3.3) the backward re-runs the MLA up-projections (wq_b,
    wkv_b) forward, and the RMSNorms and SwiGLU activations (memory-bound, see ``elementwise_bytes``).

Which GEMMs run in FP8 follows ``raymoe.fp8.convert_linears`` and the paper: every attention projection, dense FFN,
shared and routed expert; the gate, output head and MTP projection stay in BF16.

Legend: D model dim, H heads, Cq/Ckv query/key-value latent ranks, dn/dr/dv the no-RoPE, RoPE and value head dims,
I expert width, K experts per token, E routed experts, V vocabulary, S sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class Gemm:
    name: str
    k: int
    """Reduction (input) width."""
    n: int
    """Output width."""
    rows_per_token: float = 1.0
    """Rows of this GEMM per token: ``top_k`` for a routed expert (each token is a row for K experts)."""
    fp8: bool = True
    """Runs in FP8 when ``precision.fp8`` is on."""
    grouped: bool = False
    """A routed-expert GEMM: many small GEMMs in one grouped kernel (``torch._grouped_mm``)."""
    recomputed: bool = False
    """Re-run forward in the backward pass under the paper's recomputation (the MLA up-projections)."""

    @property
    def flops(self) -> float:
        return 2.0 * self.k * self.n * self.rows_per_token


@dataclass(frozen=True, kw_only=True)
class BlockWork:
    """One block's forward work per token: its GEMMs, its attention core, its memory-bound traffic."""

    gemms: tuple[Gemm, ...]
    attention_flops: float = 0.0
    elementwise_bytes: float = 0.0
    """HBM bytes read + written by the forward's elementwise kernels (norms, RoPE, SwiGLU, residuals, routing,
    permutes, loss), in the activation dtype; the backward moves twice that."""

    @property
    def gemm_flops(self) -> float:
        return sum(g.flops for g in self.gemms)

    @property
    def flops(self) -> float:
        return self.gemm_flops + self.attention_flops


def causal_context(seq_len: int) -> float:
    """Mean keys a query attends to under the causal mask, (S + 1) / 2: FlashAttention skips masked blocks."""
    return (seq_len + 1) / 2


def attention_block(cfg: ModelConfig, *, seq_len: int, act_bytes: int) -> BlockWork:
    """MLA: projections, the quadratic core, and its norms and RoPE."""
    d, h = cfg.dim, cfg.num_heads
    dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    gemms = []
    if cfg.q_lora_rank > 0:
        gemms += [Gemm(name="wq_a", k=d, n=cfg.q_lora_rank),
                  Gemm(name="wq_b", k=cfg.q_lora_rank, n=h * dqk, recomputed=True)]
    else:
        gemms.append(Gemm(name="wq", k=d, n=h * dqk))
    gemms += [Gemm(name="wkv_a", k=d, n=cfg.kv_lora_rank + cfg.qk_rope_head_dim),
              Gemm(name="wkv_b", k=cfg.kv_lora_rank, n=h * (cfg.qk_nope_head_dim + cfg.v_head_dim), recomputed=True),
              Gemm(name="wo", k=h * cfg.v_head_dim, n=d)]
    core = 2.0 * h * (dqk + cfg.v_head_dim) * causal_context(seq_len)
    # attn_norm, q_norm, kv_norm (read + write), RoPE on q and the shared k, the residual add (read 2, write 1).
    elems = 2 * d + 2 * cfg.q_lora_rank + 2 * cfg.kv_lora_rank + 2 * (h + 1) * cfg.qk_rope_head_dim + 3 * d
    return BlockWork(gemms=tuple(gemms), attention_flops=core, elementwise_bytes=elems * act_bytes)


def ffn_block(cfg: ModelConfig, *, moe: bool, top_k: int, act_bytes: int) -> BlockWork:
    """The dense SwiGLU FFN, or DeepSeekMoE: gate, shared experts, K routed experts, dispatch and combine."""
    d = cfg.dim
    norm_and_residual = 2 * d + 3 * d
    if not moe:
        i = cfg.dense_inter_dim
        gemms = (Gemm(name="ffn.w1w3", k=d, n=2 * i), Gemm(name="ffn.w2", k=i, n=d))
        return BlockWork(gemms=gemms, elementwise_bytes=(norm_and_residual + 3 * i) * act_bytes)
    i, e = cfg.moe_inter_dim, cfg.num_routed_experts
    shared = cfg.num_shared_experts * i
    gemms = [Gemm(name="gate", k=d, n=e, fp8=False)]
    if shared:
        gemms += [Gemm(name="shared.w1w3", k=d, n=2 * shared), Gemm(name="shared.w2", k=shared, n=d)]
    gemms += [Gemm(name="experts.w1w3", k=d, n=2 * i, rows_per_token=top_k, grouped=True),
              Gemm(name="experts.w2", k=i, n=d, rows_per_token=top_k, grouped=True)]
    # SwiGLU per row (read 2I, write I), permute to and from expert order (read + write D per row, twice), the
    # weighted combine (read D per row, write D), sigmoid + top-k over E in fp32.
    elems = norm_and_residual + 3 * shared + top_k * (3 * i + 4 * d + d) + d
    return BlockWork(gemms=tuple(gemms), elementwise_bytes=elems * act_bytes + 3 * e * 4)


def head_block(cfg: ModelConfig, *, act_bytes: int) -> BlockWork:
    """Final norm, output head and cross-entropy (softmax over V: read the logits, write the gradient)."""
    return BlockWork(gemms=(Gemm(name="head", k=cfg.dim, n=cfg.vocab_size, fp8=False),),
                     elementwise_bytes=(2 * cfg.dim + 3 * cfg.vocab_size) * act_bytes)


def mtp_input_block(cfg: ModelConfig, *, act_bytes: int) -> BlockWork:
    """An MTP module's input: the two RMSNorms and the 2D -> D projection (BF16, as the paper keeps it)."""
    return BlockWork(gemms=(Gemm(name="mtp.proj", k=2 * cfg.dim, n=cfg.dim, fp8=False),),
                     elementwise_bytes=6 * cfg.dim * act_bytes)
