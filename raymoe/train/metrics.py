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


class NonFiniteLoss(ArithmeticError):
    """A step produced a NaN/inf loss or gradient norm: its update has already poisoned the weights."""


def check_finite(record: dict, *, last_checkpoint=None) -> None:
    """Raise ``NonFiniteLoss`` naming the step if its losses or gradient norm are not finite.

    The trainers call it right after a step is logged and before anything is saved, so a diverged run never
    writes (or lets ``keep_checkpoints`` prune good checkpoints for) poisoned ones."""
    import math

    bad = {k: record.get(k) for k in ("loss", "mtp_loss", "total_loss", "grad_norm")
           if record.get(k) is not None and not math.isfinite(record[k])}
    if bad:
        where = (f"the last good checkpoint is {last_checkpoint} (`raymoe train --resume` it, e.g. with a lower "
                 f"optim.lr)" if last_checkpoint else "no checkpoint of this run was saved before it")
        values = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFiniteLoss(f"step {record.get('step')}: {values} (lr {record.get('lr')}); training stopped "
                            f"before saving this state; {where}")
