"""Load balancing of DeepSeek-V3: the auxiliary-loss-free bias rule, the complementary sequence-wise loss,
and the MaxVio statistic.

Legend: B sequences, T tokens per sequence, E routed experts, K experts per token.

The bias update is a pure function so that the runtime driver, which sees the *global* expert loads summed over
every worker and micro-batch, can own it (routing state is explicit, never hidden inside a module).
"""

from __future__ import annotations

import torch


def update_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """The paper's sign rule: raise the bias of under-loaded experts by gamma, lower over-loaded ones.

    ``counts_E`` are the tokens each expert received over the whole step (all micro-batches, all ranks).
    Works on stacked layers too: ``bias_RE`` with ``counts_RE``.
    """
    if bias_E.shape != counts_E.shape:
        raise ValueError(f"bias shape {tuple(bias_E.shape)} != counts shape {tuple(counts_E.shape)}")
    counts = counts_E.to(torch.float64)
    mean_load = counts.mean(dim=-1, keepdim=True)
    return bias_E + gamma * torch.sign(mean_load - counts).to(bias_E.dtype)


def sequence_balance_loss(scores_BTE: torch.Tensor, topk_ids_BTK: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss (eqs. 17-20), averaged over the B sequences.

    L_bal = alpha * sum_i f_i P_i per sequence, with
      f_i = E / (K T) * #{t : expert i in the top-K of token t}   (not differentiable)
      P_i = 1/T * sum_t s'_{i,t},  s'_{i,t} = s_{i,t} / sum_j s_{j,t}  (normalised affinities)
    """
    num_seqs, seq_len, num_experts = scores_BTE.shape
    top_k = topk_ids_BTK.shape[-1]
    if alpha == 0.0:
        return scores_BTE.new_zeros(())
    selected_BE = torch.zeros(num_seqs, num_experts, device=scores_BTE.device, dtype=scores_BTE.dtype)
    selected_BE.scatter_add_(
        1,
        topk_ids_BTK.reshape(num_seqs, -1),
        torch.ones_like(topk_ids_BTK, dtype=scores_BTE.dtype).reshape(num_seqs, -1),
    )
    f_BE = selected_BE * (num_experts / (top_k * seq_len))
    normalized_BTE = scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)
    p_BE = normalized_BTE.mean(dim=1)
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()


def max_violation(counts_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load - mean load) / mean load, per row for stacked layers; 0 when nothing was routed."""
    counts = counts_E.to(torch.float64)
    mean = counts.mean(dim=-1)
    vio = (counts.max(dim=-1).values - mean) / mean.clamp_min(1e-12)
    return torch.where(mean > 0, vio, torch.zeros_like(vio))
