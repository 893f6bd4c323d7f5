"""Turning logits into tokens: temperature, nucleus (top-p), and the speculative accept/resample rule.

Legend: B batch rows, E vocab.

Everything goes through a probability vector, greedy included (a one-hot of the argmax), so speculative decoding
has one rule for every setting (Leviathan et al. 2023; Chen et al. 2023): accept the draft d ~ q with probability
min(1, p(d) / q(d)), otherwise draw from normalize(max(p - q, 0)). That keeps the output distribution exactly the
main model's p; under greedy it accepts exactly when d is p's argmax and otherwise emits that argmax, which is why
greedy speculative output equals plain greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 0.0
    """0 is greedy (argmax); otherwise logits are divided by it before the softmax."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (1 keeps all)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def distribution(logits_BE: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The probabilities tokens are drawn from (fp32)."""
    logits_BE = logits_BE.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits_BE.argmax(dim=-1), logits_BE.shape[-1]).float()
    probs_BE = (logits_BE / sampling.temperature).softmax(dim=-1)
    if sampling.top_p < 1:
        sorted_BE, order_BE = probs_BE.sort(dim=-1, descending=True)
        before_BE = sorted_BE.cumsum(dim=-1) - sorted_BE  # mass of the more likely tokens
        sorted_BE = sorted_BE.masked_fill(before_BE >= sampling.top_p, 0.0)  # the most likely token always stays
        probs_BE = torch.zeros_like(probs_BE).scatter_(-1, order_BE, sorted_BE)
        probs_BE = probs_BE / probs_BE.sum(dim=-1, keepdim=True)
    return probs_BE


def draw(probs_BE: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs_BE, 1, generator=generator).squeeze(1)


def speculative_choice(p_BE: torch.Tensor, q_BE: torch.Tensor, draft_B: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted_B, token_B): keep the draft with probability min(1, p/q) at it, else resample the residual."""
    rows = torch.arange(len(draft_B))
    ratio_B = p_BE[rows, draft_B] / q_BE[rows, draft_B]
    accepted_B = torch.rand(len(draft_B), generator=generator) < ratio_B
    residual_BE = (p_BE - q_BE).clamp(min=0.0)
    empty = residual_BE.sum(dim=-1, keepdim=True) == 0  # p == q: the residual is undefined, and never drawn
    residual_BE = torch.where(empty, p_BE, residual_BE)
    resampled_B = draw(residual_BE / residual_BE.sum(dim=-1, keepdim=True), generator)
    return accepted_B, torch.where(accepted_B, draft_B, resampled_B)
