"""Evaluation: perplexity, KL divergence and top-1 agreement against a reference, run reports and plots."""

from qjax.eval.metrics import EvalResult as EvalResult
from qjax.eval.metrics import evaluate as evaluate
from qjax.eval.report import RunReport as RunReport
from qjax.eval.report import TensorLog as TensorLog
from qjax.eval.report import sizes as sizes
from qjax.eval.report import versions as versions
from qjax.eval.report import write_report as write_report

__all__ = ["EvalResult", "RunReport", "TensorLog", "evaluate", "sizes", "versions", "write_report"]
