"""Forward passes with the MLA cache, in the absorbed form of MLA inference.

Legend: B batch, T new tokens, S cached slots, D model dim, H heads, N no-RoPE head dim, R RoPE head dim,
V value head dim, C kv_lora_rank, E vocab.

Absorption (DeepSeek-V2 section 2.1.2): the key up-projection W_UK folds into the query and the value
up-projection W_UV into the output, so attention runs directly on the cached latent and keys and values are never
rebuilt: score = (W_UK^T q_nope) . c + q_rope . k_rope, and out = W_UV (sum_s p_s c_s). Same function as the
training forward (checked against ``forward.logits`` in tests), different summation order.

These functions read the training modules' weights (``MLA``, ``Block``, ``MTPModule``) and leave training code
untouched.
"""

from __future__ import annotations

import torch

from raymoe.generate.cache import MLACache
from raymoe.model.block import Block
from raymoe.model.mla import MLA
from raymoe.model.moe import MoE
from raymoe.model.transformer import Transformer


def rope_at(x_BTHR: torch.Tensor, cos_BTR2: torch.Tensor, sin_BTR2: torch.Tensor) -> torch.Tensor:
    """``layers.apply_rope`` with a position per (row, token): adjacent channel pairs rotate together."""
    x = x_BTHR.float().unflatten(-1, (-1, 2))
    even, odd = x[..., 0], x[..., 1]
    cos, sin = cos_BTR2[:, :, None, :], sin_BTR2[:, :, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x_BTHR.dtype)


def rope_tables(model: Transformer, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    limit = model.rope.max_seq_len
    if int(positions_BT.max()) >= limit:
        raise ValueError(f"position {int(positions_BT.max())} is past model.max_seq_len ({limit}): "
                         f"shorten the prompt or --max-new-tokens")
    cos_PR2, sin_PR2 = model.rope.tables(limit, positions_BT.device)
    return cos_PR2[positions_BT], sin_PR2[positions_BT]


def mla_step(attn: MLA, x_BTD, rope, cache: MLACache, layer: int, mask_BTS) -> torch.Tensor:
    batch, num_new, _ = x_BTD.shape
    cos, sin = rope
    q_BTHQ = attn._queries(x_BTD).view(batch, num_new, attn.num_heads, -1)
    q_nope_BTHN, q_rope_BTHR = q_BTHQ.split([attn.nope_dim, attn.rope_dim], dim=-1)
    q_rope_BTHR = rope_at(q_rope_BTHR, cos, sin)
    c_kv_BTC, k_rope_BTR = attn.wkv_a(x_BTD).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    k_rope_BTR = rope_at(k_rope_BTR.unsqueeze(2), cos, sin).squeeze(2)
    latent_BSC, k_rope_BSR = cache.write(layer, attn.kv_norm(c_kv_BTC), k_rope_BTR)

    w_HXC = attn.wkv_b.weight.view(attn.num_heads, attn.nope_dim + attn.v_dim, attn.kv_lora_rank)
    w_uk_HNC, w_uv_HVC = w_HXC.split([attn.nope_dim, attn.v_dim], dim=1)
    q_latent_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)
    scores_BHTS = (torch.einsum("bthc,bsc->bhts", q_latent_BTHC, latent_BSC)
                   + torch.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR)) * attn.softmax_scale
    scores_BHTS = scores_BHTS.float().masked_fill(~mask_BTS[:, None], float("-inf"))
    probs_BHTS = scores_BHTS.softmax(dim=-1).to(latent_BSC.dtype)
    context_BTHC = torch.einsum("bhts,bsc->bthc", probs_BHTS, latent_BSC)
    out_BTHV = torch.einsum("bthc,hvc->bthv", context_BTHC, w_uv_HVC)
    return attn.wo(out_BTHV.reshape(batch, num_new, -1))


def block_step(block: Block, h_BTD, rope, cache: MLACache, layer: int, mask_BTS) -> torch.Tensor:
    h_BTD = h_BTD + mla_step(block.attn, block.attn_norm(h_BTD), rope, cache, layer, mask_BTS)
    normed = block.ffn_norm(h_BTD)
    ffn_out = block.ffn(normed)[0] if isinstance(block.ffn, MoE) else block.ffn(normed)
    return h_BTD + ffn_out


@torch.no_grad()
def main_step(model: Transformer, tokens_BT, positions_BT, valid_BT, cache: MLACache
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed T new tokens per row; returns (last hidden state h_BTD, logits_BTE in fp32)."""
    mask_BTS = cache.open(valid_BT)
    rope = rope_tables(model, positions_BT)
    h_BTD = model.embed(tokens_BT)
    for i, layer in enumerate(model.layers):
        h_BTD = block_step(layer, h_BTD, rope, cache, i, mask_BTS)
    cache.close(tokens_BT.shape[1])
    return h_BTD, model.head(model.norm(h_BTD)).float()


@torch.no_grad()
def mtp_step(model: Transformer, h_prev_BTD, next_tokens_BT, positions_BT, valid_BT, cache: MLACache
             ) -> torch.Tensor:
    """MTP module 0 at T positions: reads the main model's h_i and the token i+1, predicts token i+2 (logits)."""
    module = model.mtp[0]
    mask_BTS = cache.open(valid_BT)
    merged = module.proj(torch.cat([module.hnorm(h_prev_BTD), module.enorm(model.embed(next_tokens_BT))], dim=-1))
    h_BTD = block_step(module.block, merged, rope_tables(model, positions_BT), cache, 0, mask_BTS)
    cache.close(next_tokens_BT.shape[1])
    return model.head(module.norm(h_BTD)).float()


def new_cache(model: Transformer, *, num_layers: int, batch: int, capacity: int) -> MLACache:
    cfg = model.cfg
    return MLACache(num_layers=num_layers, batch=batch, capacity=capacity, kv_lora_rank=cfg.kv_lora_rank,
                    rope_dim=cfg.qk_rope_head_dim, dtype=model.embed.weight.dtype, device=model.embed.weight.device)
