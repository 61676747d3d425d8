"""Calibration: text and token windows, the statistics registry, what under-fed experts quantize with, the blockwise
runner, the whole-model loop."""

from qjax.calib.experts import ExpertPolicy as ExpertPolicy
from qjax.calib.quantize import quantize_model as quantize_model
from qjax.calib.runner import BlockModel as BlockModel
from qjax.calib.runner import RunnerOptions as RunnerOptions
from qjax.calib.runner import quantize_blocks as quantize_blocks
from qjax.calib.stats import STATISTICS as STATISTICS
from qjax.calib.stats import Statistic as Statistic
from qjax.calib.stats import register as register_statistic
from qjax.calib.text import calibration_windows as calibration_windows
from qjax.calib.text import eval_windows as eval_windows
from qjax.calib.text import load_text as load_text
from qjax.calib.text import tokenize as tokenize

__all__ = [
  "STATISTICS",
  "BlockModel",
  "ExpertPolicy",
  "RunnerOptions",
  "Statistic",
  "calibration_windows",
  "eval_windows",
  "load_text",
  "quantize_blocks",
  "quantize_model",
  "register_statistic",
  "tokenize",
]
