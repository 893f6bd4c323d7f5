"""Gate math shared by the model and the runtime (pure torch, no module state)."""

from raymoe.routing.balance import max_violation, sequence_balance_loss, update_bias
from raymoe.routing.gate import affinity_scores, expert_counts, group_limited_mask, select_experts

__all__ = [
    "affinity_scores",
    "expert_counts",
    "group_limited_mask",
    "max_violation",
    "select_experts",
    "sequence_balance_loss",
    "update_bias",
]
