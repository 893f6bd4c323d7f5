"""DeepSeekMoE: always-on shared expert(s) plus fine-grained routed experts, dropless.

Legend: B batch, T sequence, N = B*T tokens, D model dim, E routed experts, K experts per token.

The gate holds the balancing bias as a buffer, but the bias is *routing state owned by the driver*: it is
written through ``Transformer.set_routing_biases`` each step and never learned. Every MoE forward returns a
``RouterStats`` (per-expert token counts for the bias rule and MaxVio, plus the sequence-wise balance loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig, RoutingConfig
from raymoe.model.layers import MLP
from raymoe.routing import affinity_scores, expert_counts, select_experts, sequence_balance_loss


@dataclass(frozen=True)
class RouterStats:
    slot: int
    """Row of this router in the (num_routers, E) routing-state tensor."""
    counts_E: torch.Tensor
    """Tokens routed to each expert in this forward (int64, no grad)."""
    balance_loss: torch.Tensor
    """Sequence-wise balance loss (already multiplied by alpha), differentiable."""


class Gate(nn.Module):
    """Router logits in fp32 (the paper keeps gating in high precision), selection with the bias."""

    def __init__(self, dim: int, num_experts: int, routing: RoutingConfig, slot: int) -> None:
        super().__init__()
        self.slot = slot
        self.routing = routing
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.routing
        scores_NE = affinity_scores(F.linear(x_ND.float(), self.weight.float()), r.score_func)
        topk_ids_NK, weights_NK = select_experts(
            scores_NE,
            self.bias,
            top_k=r.top_k,
            num_groups=r.num_groups,
            groups_kept=r.groups_kept,
            route_scale=r.route_scale,
            normalize=r.score_func == "sigmoid",
        )
        return scores_NE, topk_ids_NK, weights_NK


def run_routed_experts(
    experts: nn.ModuleList,
    x_ND: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    counts_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local (single-device) dispatch: sort token copies by expert, run each expert once, combine.

    Every expert runs, even on zero tokens, so every expert parameter gets a (zero) gradient: optimizers and
    ZeRO then see the same set of gradients on every step.
    """
    top_k = topk_ids_NK.shape[1]
    flat_ids = topk_ids_NK.flatten()
    order = flat_ids.argsort(stable=True)
    if counts_E is None:
        counts_E = expert_counts(topk_ids_NK, len(experts))
    counts = counts_E.tolist()
    token_of_copy = order // top_k
    x_sorted = x_ND[token_of_copy]
    outputs = [expert(chunk) for expert, chunk in zip(experts, x_sorted.split(counts))]
    y_sorted = torch.cat(outputs) * weights_NK.flatten()[order].unsqueeze(1).to(x_ND.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token_of_copy, y_sorted)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, routing: RoutingConfig, slot: int) -> None:
        super().__init__()
        self.alpha = routing.seq_aux_alpha
        self.num_experts = cfg.num_routed_experts
        self.gate = Gate(cfg.dim, cfg.num_routed_experts, routing, slot)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.num_routed_experts))
        self.shared = MLP(cfg.dim, cfg.num_shared_experts * cfg.moe_inter_dim) if cfg.num_shared_experts else None

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        batch, seq_len, dim = x_BTD.shape
        x_ND = x_BTD.reshape(-1, dim)
        scores_NE, topk_ids_NK, weights_NK = self.gate(x_ND)
        balance_loss = sequence_balance_loss(
            scores_NE.view(batch, seq_len, -1), topk_ids_NK.view(batch, seq_len, -1), alpha=self.alpha
        )
        counts_E = expert_counts(topk_ids_NK, self.num_experts)
        y_ND = run_routed_experts(self.experts, x_ND, topk_ids_NK, weights_NK, counts_E)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        stats = RouterStats(self.gate.slot, counts_E, balance_loss)
        return y_ND.view(batch, seq_len, dim), stats
