"""Where a run stands, held alike by the single-process trainer and the Ray driver: steps done, tokens seen and
the aux-loss-free routing biases, plus the per-step schedule lines (learning rate, MTP weight, bias speed gamma)
and the end-of-step update (the bias rule on the step's global expert load, the counters). One object, so the two
trainers cannot drift apart; checkpoints save and restore exactly these three values (``RunState``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.config import Config
from raymoe.routing import update_bias
from raymoe.train.optim import lr_at


@dataclass(frozen=True, kw_only=True)
class StepKnobs:
    lr: float
    mtp_weight: float
    gamma: float


@dataclass(kw_only=True)
class RunProgress:
    routing_bias_RE: torch.Tensor
    """The routing state: every router's balancing bias (routers x experts), owned by the trainer."""
    step_index: int = 0
    tokens_seen: int = 0

    def knobs(self, config: Config) -> StepKnobs:
        """The schedules at this point of the run (learning rate by step; MTP weight and gamma by tokens)."""
        return StepKnobs(lr=lr_at(self.step_index, config.optim, config.run.steps),
                         mtp_weight=config.mtp.weight_at(self.tokens_seen),
                         gamma=config.routing.gamma_at(self.tokens_seen))

    def advance(self, config: Config, tokens_BL: torch.Tensor, counts_RE: torch.Tensor,
                knobs: StepKnobs) -> tuple[int, int]:
        """End a step: the bias rule on its global expert load, its tokens counted; returns (the step's index,
        the tokens it trained on)."""
        self.routing_bias_RE = update_bias(self.routing_bias_RE, counts_RE, knobs.gamma)
        num_tokens = tokens_BL.shape[0] * (tokens_BL.shape[1] - 1 - config.mtp.depth)
        self.tokens_seen += num_tokens
        step, self.step_index = self.step_index, self.step_index + 1
        return step, num_tokens


def _delegate(name: str) -> property:
    return property(lambda self: getattr(self.progress, name), lambda self, value: setattr(self.progress, name, value))


class TracksProgress:
    """``step_index``, ``tokens_seen`` and ``routing_bias_RE`` of a trainer that holds a ``RunProgress``."""

    progress: RunProgress
    step_index = _delegate("step_index")
    tokens_seen = _delegate("tokens_seen")
    routing_bias_RE = _delegate("routing_bias_RE")
