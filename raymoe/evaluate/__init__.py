"""Held-out evaluation: loss, perplexity and bits per byte of the main model on a dataset directory
(``heldout``), and the same every K steps of a training run (``periodic``)."""

from raymoe.evaluate.heldout import EvalResult, evaluate
from raymoe.evaluate.periodic import PeriodicEval

__all__ = ["EvalResult", "PeriodicEval", "evaluate"]
