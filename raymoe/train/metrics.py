"""The per-step record every trainer writes (``metrics.jsonl``): one flat JSON object per step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from raymoe.routing import max_violation


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    step: int
    loss: float
    """Main next-token cross-entropy (what people compare across runs)."""
    mtp_loss: float
    balance_loss: float
    total_loss: float
    """The optimised objective: loss + mtp_weight * mtp_loss + balance_loss."""
    max_vio: float
    """MaxVio averaged over the MoE layers (per layer in ``max_vio_per_layer``)."""
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    step_time_s: float
    mtp_weight: float
    bias_gamma: float
    max_vio_per_layer: list[float] = field(default_factory=list)
    expert_load: list[list[int]] = field(default_factory=list)
    """Tokens per expert, one row per router (MoE layers then MTP blocks)."""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        record = asdict(self)
        record.update(record.pop("extra"))
        return record


def load_statistics(counts_RE: torch.Tensor) -> tuple[float, list[float]]:
    if counts_RE.numel() == 0:
        return 0.0, []
    per_layer = max_violation(counts_RE).tolist()
    return float(sum(per_layer) / len(per_layer)), per_layer
