"""Core quantization math: specs, packed codes, affine grids, `QArray`. No models, no Flax."""

from qjax.core.affine import AffineParams as AffineParams
from qjax.core.affine import ClipSearch as ClipSearch
from qjax.core.packing import pack as pack
from qjax.core.packing import unpack as unpack
from qjax.core.qarray import QArray as QArray
from qjax.core.qarray import dequantize as dequantize
from qjax.core.qarray import from_codes as from_codes
from qjax.core.qarray import is_qarray as is_qarray
from qjax.core.qarray import quantize as quantize
from qjax.core.qspec import QSpec as QSpec

__all__ = [
  "AffineParams",
  "ClipSearch",
  "QArray",
  "QSpec",
  "dequantize",
  "from_codes",
  "is_qarray",
  "pack",
  "quantize",
  "unpack",
]
