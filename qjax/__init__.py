"""qjax: post-training quantization of large language models in JAX."""

from qjax.core import ClipSearch as ClipSearch
from qjax.core import QArray as QArray
from qjax.core import QSpec as QSpec
from qjax.core import dequantize as dequantize
from qjax.transforms import Rule as Rule
from qjax.transforms import Transform as Transform
from qjax.transforms import chain as chain
from qjax.transforms import plan as plan
from qjax.transforms import quantize_params as quantize_params
from qjax.transforms import rtn as rtn

__version__ = "0.1.0"

__all__ = [
  "ClipSearch",
  "QArray",
  "QSpec",
  "Rule",
  "Transform",
  "chain",
  "dequantize",
  "plan",
  "quantize_params",
  "rtn",
]
