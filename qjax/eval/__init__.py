"""Evaluation: perplexity, KL divergence and top-1 agreement against a reference, run reports and plots; each
linear's sensitivity (the Fisher-weighted rounding error) and llama.cpp types allocated by it to a budget."""

from qjax.eval.metrics import EvalResult as EvalResult
from qjax.eval.metrics import evaluate as evaluate
from qjax.eval.report import RunReport as RunReport
from qjax.eval.report import TensorLog as TensorLog
from qjax.eval.report import sizes as sizes
from qjax.eval.report import versions as versions
from qjax.eval.report import write_report as write_report
from qjax.eval.sensitivity import Allocation as Allocation
from qjax.eval.sensitivity import allocate_affine as allocate_affine
from qjax.eval.sensitivity import allocate_gguf as allocate_gguf
from qjax.eval.sensitivity import fisher_diagonal as fisher_diagonal

__all__ = [
  "Allocation",
  "EvalResult",
  "RunReport",
  "TensorLog",
  "allocate_affine",
  "allocate_gguf",
  "evaluate",
  "fisher_diagonal",
  "sizes",
  "versions",
  "write_report",
]
