"""The DeepSeek-V3 model on one device: embedding, blocks, final norm, output head, MTP modules.

Legend: B batch, L = T + 1 + D tokens per sample, T positions trained, D MTP depth, V vocab, R routers, E experts.

A sample carries ``T + 1 + D`` tokens so that every MTP depth trains on all T positions: the main model reads
tokens[:, :T] and predicts tokens[:, 1:T+1]; MTP module k reads the embedding of tokens[:, k:T+k] and predicts
tokens[:, k+1:T+k+1].

The pieces are exposed separately (``embed_inputs``, ``layers``, ``output_losses``) because a pipeline stage
runs only its slice of them; ``forward`` composes them for the single-process reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import ModelConfig, MtpConfig, RoutingConfig
from raymoe.model.block import Block
from raymoe.model.layers import RMSNorm, Rope
from raymoe.model.moe import Gate, RouterStats
from raymoe.model.mtp import MTPModule


def router_slots(cfg: ModelConfig, mtp_depth: int) -> list[int]:
    """Layer ids that own a router, in routing-state row order: MoE layers, then MTP blocks (num_layers + k)."""
    return [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)] + [cfg.num_layers + k for k in range(mtp_depth)]


def positions_trained(num_tokens: int, mtp_depth: int) -> int:
    positions = num_tokens - 1 - mtp_depth
    if positions < 1:
        raise ValueError(f"a sample of {num_tokens} tokens is too short for MTP depth {mtp_depth}")
    return positions


@dataclass
class ModelOutput:
    loss: torch.Tensor
    """main + mtp_weight * mtp + balance; the tensor to backpropagate."""
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor
    """Mean over the D MTP depths of their cross-entropies (0 without MTP)."""
    balance_loss: torch.Tensor
    router_stats: list[RouterStats] = field(default_factory=list)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, routing: RoutingConfig, mtp: MtpConfig,
                 expert_ids: Sequence[int] | None = None) -> None:
        """``expert_ids``: the routed experts (global ids) every MoE layer builds; default all (one device)."""
        super().__init__()
        self.cfg = cfg
        self.mtp_depth = mtp.depth
        slots = {layer_id: row for row, layer_id in enumerate(router_slots(cfg, mtp.depth))}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg, routing, moe_slot=slots.get(i), expert_ids=expert_ids) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, routing, moe_slot=slots[cfg.num_layers + k], expert_ids=expert_ids) for k in range(mtp.depth)
        )
        self.rope = Rope(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)

    # -- pieces a pipeline stage runs -------------------------------------------------------------------------
    def embed_inputs(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens_BL[:, : positions_trained(tokens_BL.shape[1], self.mtp_depth)])

    def output_losses(
        self, h_BTD: torch.Tensor, tokens_BL: torch.Tensor, mtp_weight: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[RouterStats]]:
        """Final norm + head + MTP on the last hidden state: (main_ce, mtp_ce, loss_part, mtp router stats)."""
        return output_losses(self, h_BTD, tokens_BL, mtp_weight)

    # -- the single-process reference ----------------------------------------------------------------------------
    def forward(self, tokens_BL: torch.Tensor, *, mtp_weight: float = 0.0) -> ModelOutput:
        h_BTD = self.embed_inputs(tokens_BL)
        rope = self.rope.tables(h_BTD.shape[1], h_BTD.device)
        stats: list[RouterStats] = []
        for layer in self.layers:
            h_BTD, layer_stats = layer(h_BTD, rope)
            if layer_stats is not None:
                stats.append(layer_stats)
        layers_balance = sum((s.balance_loss for s in stats), h_BTD.new_zeros(()))
        main_ce, mtp_ce, loss, mtp_stats = self.output_losses(h_BTD, tokens_BL, mtp_weight)
        stats.extend(mtp_stats)  # ``loss`` already holds the MTP blocks' balance losses
        balance = sum((s.balance_loss for s in stats), h_BTD.new_zeros(()))
        return ModelOutput(loss + layers_balance, main_ce.detach(), mtp_ce.detach(), balance.detach(), stats)

    # -- routing state (owned by the driver, written here each step) ---------------------------------------------
    def gates(self) -> list[Gate]:
        return [m for m in self.modules() if isinstance(m, Gate)]

    def num_routers(self) -> int:
        return len(router_slots(self.cfg, self.mtp_depth))

    def routing_biases(self) -> torch.Tensor:
        bias_RE = torch.zeros(self.num_routers(), self.cfg.num_routed_experts)
        for gate in self.gates():
            bias_RE[gate.slot] = gate.bias.detach().cpu()
        return bias_RE

    def set_routing_biases(self, bias_RE: torch.Tensor) -> None:
        set_gate_biases(self.gates(), bias_RE)


def set_gate_biases(gates: list[Gate], bias_RE: torch.Tensor) -> None:
    """Copy each gate's row of the driver's (R, E) bias tensor into the gate's buffer."""
    for gate in gates:
        gate.bias.copy_(bias_RE[gate.slot].to(gate.bias.device, gate.bias.dtype))


class _OutputModules:
    """What ``output_losses`` needs; a Transformer or a pipeline's last stage provides it."""

    embed: nn.Embedding
    norm: RMSNorm
    head: nn.Linear
    mtp: nn.ModuleList
    rope: Rope


def output_losses(
    m: _OutputModules, h_BTD: torch.Tensor, tokens_BL: torch.Tensor, mtp_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[RouterStats]]:
    """Cross-entropy of the main head and of each MTP depth.

    Returns (main_ce, mtp_ce, loss, stats) where loss = main_ce + mtp_weight * mtp_ce + the MTP blocks' balance
    losses, and stats are the MTP blocks' router stats. Cross-entropies are means over tokens of the batch, so a
    batch split into equal micro-batches gives the same gradient as the mean of the micro-batch losses.
    """
    seq_len = h_BTD.shape[1]
    main_ce = F.cross_entropy(m.head(m.norm(h_BTD)).flatten(0, 1).float(), tokens_BL[:, 1 : seq_len + 1].flatten())
    depth = len(m.mtp)
    if depth == 0:
        return main_ce, main_ce.new_zeros(()), main_ce, []
    rope = m.rope.tables(seq_len, h_BTD.device)
    stats: list[RouterStats] = []
    mtp_ce = main_ce.new_zeros(())
    h_prev = h_BTD
    for k, module in enumerate(m.mtp, start=1):
        h_prev, block_stats = module(h_prev, m.embed(tokens_BL[:, k : seq_len + k]), rope)
        if block_stats is not None:
            stats.append(block_stats)
        logits = m.head(module.norm(h_prev)).flatten(0, 1).float()
        mtp_ce = mtp_ce + F.cross_entropy(logits, tokens_BL[:, k + 1 : seq_len + k + 1].flatten())
    mtp_ce = mtp_ce / depth
    balance = sum((s.balance_loss for s in stats), main_ce.new_zeros(()))
    return main_ce, mtp_ce, main_ce + mtp_weight * mtp_ce + balance, stats
