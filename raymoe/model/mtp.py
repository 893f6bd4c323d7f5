"""Multi-token prediction module (DeepSeek-V3 section 2.2).

Module k (1-based) predicts token t_{i+k+1} at position i, sequentially after module k-1:
    h'_i = proj([RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))])
    h^k  = Block_k(h')
    logits = Head(RMSNorm_k(h^k))
Embedding and output head are shared with the main model (passed in, not owned), so the module's own
parameters are two input norms, the projection, a transformer block and its final norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raymoe.config import ModelConfig, RoutingConfig
from raymoe.model.block import Block
from raymoe.model.layers import RMSNorm
from raymoe.model.moe import RouterStats


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, routing: RoutingConfig, *, moe_slot: int,
                 expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, routing, moe_slot=moe_slot, expert_ids=expert_ids)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self, h_prev_BTD: torch.Tensor, emb_next_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, RouterStats | None]:
        merged = self.proj(torch.cat([self.hnorm(h_prev_BTD), self.enorm(emb_next_BTD)], dim=-1))
        return self.block(merged, rope)
