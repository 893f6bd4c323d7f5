"""Multi-head Latent Attention (DeepSeek-V2/V3).

Legend: B batch, T sequence, D model dim, H heads, Cq/Ckv query/key-value latent ranks,
N no-RoPE head dim, R RoPE head dim, V value head dim.

Keys and values are reconstructed from a small latent c_kv (rank Ckv) -- that latent and the shared RoPE key are
all an inference cache would hold. Position enters only through a *decoupled* RoPE part: queries get a per-head
RoPE slice, keys get one RoPE slice shared by all heads, because RoPE cannot be absorbed into the low-rank
up-projection. Training runs the naive (non-absorbed) form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig
from raymoe.model.layers import RMSNorm, apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_head_dim = cfg.qk_head_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.num_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, cfg.num_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = qk_head_dim**-0.5

    def _queries(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wq"):
            return self.wq(x_BTD)
        return self.wq_b(self.q_norm(self.wq_a(x_BTD)))

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, seq_len, _ = x_BTD.shape
        cos, sin = rope
        q_BTHQ = self._queries(x_BTD).view(batch, seq_len, self.num_heads, -1)
        q_nope_BTHN, q_rope_BTHR = q_BTHQ.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin)

        latent = self.wkv_a(x_BTD)
        c_kv_BTC, k_rope_BTR = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope_BT1R = apply_rope(k_rope_BTR.unsqueeze(2), cos, sin)
        kv_BTHX = self.wkv_b(self.kv_norm(c_kv_BTC)).view(batch, seq_len, self.num_heads, -1)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([self.nope_dim, self.v_dim], dim=-1)

        q_BHTQ = torch.cat([q_nope_BTHN, q_rope_BTHR], dim=-1).transpose(1, 2)
        k_BTHQ = torch.cat([k_nope_BTHN, k_rope_BT1R.expand(-1, -1, self.num_heads, -1)], dim=-1)
        out_BHTV = F.scaled_dot_product_attention(
            q_BHTQ, k_BTHQ.transpose(1, 2), v_BTHV.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )
        return self.wo(out_BHTV.transpose(1, 2).reshape(batch, seq_len, -1))
