"""One pre-norm transformer block: MLA attention, then a dense FFN (first layers) or DeepSeekMoE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raymoe.config import ModelConfig, RoutingConfig
from raymoe.model.layers import MLP, RMSNorm
from raymoe.model.mla import MLA
from raymoe.model.moe import MoE, RouterStats


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, routing: RoutingConfig, *, moe_slot: int | None,
                 expert_ids: Sequence[int] | None = None) -> None:
        """``moe_slot`` is this block's router row in the routing state, or None for a dense block;
        ``expert_ids`` the routed experts built here (default: all)."""
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.dense_inter_dim) if moe_slot is None else MoE(cfg, routing, moe_slot, expert_ids)

    def forward(
        self, h_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, RouterStats | None]:
        h_BTD = h_BTD + self.attn(self.attn_norm(h_BTD), rope)
        normed = self.ffn_norm(h_BTD)
        if isinstance(self.ffn, MoE):
            ffn_out, stats = self.ffn(normed)
            return h_BTD + ffn_out, stats
        return h_BTD + self.ffn(normed), None
