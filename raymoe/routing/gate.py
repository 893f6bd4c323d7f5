"""Top-k expert selection of DeepSeek-V3 (section 2.1.2), as pure functions shared by model and runtime.

Legend: T tokens, E routed experts, K experts per token (top_k), G expert groups (nodes).

Selection and weighting are deliberately decoupled:
  * the balancing bias ``bias_E`` is added to the affinities only to *choose* experts;
  * the gate weights come from the *unbiased* affinities of the chosen experts, normalised over the chosen
    (sigmoid gate) and multiplied by ``route_scale``.
Group (node) limited routing ranks the G groups by the sum of their top-(K / groups_kept) biased affinities and
only lets a token use experts of the best ``groups_kept`` groups, which bounds each token's cross-node traffic.
"""

from __future__ import annotations

import torch


def affinity_scores(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Token-to-expert affinities s_{i,t}: sigmoid in DeepSeek-V3, softmax in V2."""
    if score_func == "sigmoid":
        return logits_TE.sigmoid()
    if score_func == "softmax":
        return logits_TE.softmax(dim=-1)
    raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")


def group_limited_mask(biased_TE: torch.Tensor, *, num_groups: int, groups_kept: int, top_k: int) -> torch.Tensor:
    """Boolean (T, E) mask of the experts each token may choose under group-limited routing."""
    num_tokens, num_experts = biased_TE.shape
    if num_groups == 1:
        return torch.ones_like(biased_TE, dtype=torch.bool)
    per_group_TGe = biased_TE.view(num_tokens, num_groups, num_experts // num_groups)
    best_per_group = max(1, top_k // groups_kept)
    group_scores_TG = per_group_TGe.topk(best_per_group, dim=-1).values.sum(dim=-1)
    kept_TG = group_scores_TG.topk(groups_kept, dim=-1).indices
    keep_TG = torch.zeros(num_tokens, num_groups, dtype=torch.bool, device=biased_TE.device)
    keep_TG.scatter_(1, kept_TG, True)
    return keep_TG.repeat_interleave(num_experts // num_groups, dim=1)


def select_experts(
    scores_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    *,
    top_k: int,
    num_groups: int = 1,
    groups_kept: int = 1,
    route_scale: float = 1.0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose K experts per token and their gate weights.

    Returns ``(topk_ids_TK, weights_TK)``. ``bias_E`` affects which experts are chosen, never the weights.
    """
    biased_TE = scores_TE if bias_E is None else scores_TE + bias_E.to(scores_TE.dtype)
    allowed_TE = group_limited_mask(biased_TE, num_groups=num_groups, groups_kept=groups_kept, top_k=top_k)
    masked_TE = biased_TE.masked_fill(~allowed_TE, float("-inf"))
    topk_ids_TK = masked_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, topk_ids_TK)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return topk_ids_TK, weights_TK * route_scale


def expert_counts(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int64, shape (E,))."""
    return torch.bincount(topk_ids_TK.flatten(), minlength=num_experts)
