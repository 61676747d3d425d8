"""Evaluation: perplexity, KL divergence against a reference, top-1 agreement."""

from qjax.eval.metrics import EvalResult as EvalResult
from qjax.eval.metrics import evaluate as evaluate

__all__ = ["EvalResult", "evaluate"]
