"""DeepSeekMoE: always-on shared expert(s) plus fine-grained routed experts, dropless.

Legend: B batch, T sequence, N = B*T tokens, D model dim, E routed experts, K experts per token.

The gate holds the balancing bias as a buffer, but the bias is *routing state owned by the driver*: it is
written through ``Transformer.set_routing_biases`` each step and never learned. Every MoE forward returns a
``RouterStats`` (per-expert token counts for the bias rule and MaxVio, plus the sequence-wise balance loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig, RoutingConfig
from raymoe.model.dispatch import LocalDispatcher, TokenDispatcher, run_local_experts
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
    experts: nn.ModuleDict,
    x_ND: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
) -> torch.Tensor:
    """Single-device dispatch: every expert of ``experts`` (keyed by global id) is here; see ``run_local_experts``."""
    return run_local_experts(experts, x_ND, topk_ids_NK, weights_NK)


class MoE(nn.Module):
    """Gate, the routed experts this rank holds (all of them on one device), shared expert(s).

    ``expert_ids``: the global ids of the routed experts built here (default: all). The experts live in a
    ``ModuleDict`` keyed by global id, so a rank holding experts 8..15 names them ``experts.8`` .. ``experts.15``,
    exactly as the full model does: checkpoints, exports and parity compare parameters by the same names whatever
    the expert-parallel size. Tokens reach the experts through ``self.dispatcher`` (a ``TokenDispatcher``): the
    local twin here, the all-to-all one when ``raymoe.parallel`` installs it.
    """

    def __init__(self, cfg: ModelConfig, routing: RoutingConfig, slot: int,
                 expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.alpha = routing.seq_aux_alpha
        self.num_experts = cfg.num_routed_experts
        self.gate = Gate(cfg.dim, cfg.num_routed_experts, routing, slot)
        ids = range(cfg.num_routed_experts) if expert_ids is None else sorted(expert_ids)
        self.experts = nn.ModuleDict({str(e): MLP(cfg.dim, cfg.moe_inter_dim) for e in ids})
        self.shared = MLP(cfg.dim, cfg.num_shared_experts * cfg.moe_inter_dim) if cfg.num_shared_experts else None
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        self.expert_backend = "auto"
        """How the routed experts run (``raymoe.model.dispatch.run_local_experts``): grouped GEMMs for BF16 on
        CUDA, one expert after another elsewhere; ``loop`` or ``grouped_mm`` force one."""

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        batch, seq_len, dim = x_BTD.shape
        x_ND = x_BTD.reshape(-1, dim)
        scores_NE, topk_ids_NK, weights_NK = self.gate(x_ND)
        balance_loss = sequence_balance_loss(
            scores_NE.view(batch, seq_len, -1), topk_ids_NK.view(batch, seq_len, -1), alpha=self.alpha
        )
        counts_E = expert_counts(topk_ids_NK, self.num_experts)
        slot = self.gate.slot
        x_RD, ids_RK, weights_RK, plan = self.dispatcher.dispatch(x_ND, topk_ids_NK, weights_NK, layer=slot)
        y_RD = run_local_experts(self.experts, x_RD, ids_RK, weights_RK, plan.recv_counts,
                                 backend=self.expert_backend)
        y_ND = self.dispatcher.combine(y_RD, plan, layer=slot, out_dtype=x_ND.dtype)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        stats = RouterStats(slot, counts_E, balance_loss)
        return y_ND.view(batch, seq_len, dim), stats


def is_expert_parameter(name: str) -> bool:
    """Whether a parameter (by its model name) belongs to a routed expert: sharded over ep, reduced over edp."""
    return ".experts." in name or name.startswith("experts.")
