"""Core quantization math: specs, rounding grids, packed codes, `QArray`, parameter trees by path. No Flax."""

from qjax.core.affine import AffineGrid as AffineGrid
from qjax.core.affine import ClipSearch as ClipSearch
from qjax.core.errors import InputError as InputError
from qjax.core.fp_grid import Fp8Grid as Fp8Grid
from qjax.core.fp_grid import MxFp4Grid as MxFp4Grid
from qjax.core.fp_grid import NvFp4Grid as NvFp4Grid
from qjax.core.ggml_grid import GgmlGrid as GgmlGrid
from qjax.core.grid import Grid as Grid
from qjax.core.grid import GroupParams as GroupParams
from qjax.core.grid import TensorGrid as TensorGrid
from qjax.core.packing import pack as pack
from qjax.core.packing import unpack as unpack
from qjax.core.per_tensor import PerTensorGrid as PerTensorGrid
from qjax.core.qarray import QArray as QArray
from qjax.core.qarray import dequantize as dequantize
from qjax.core.qarray import from_codes as from_codes
from qjax.core.qarray import grid_values as grid_values
from qjax.core.qarray import is_qarray as is_qarray
from qjax.core.qarray import quantize as quantize
from qjax.core.qarray import round_to_grid as round_to_grid
from qjax.core.qspec import QSpec as QSpec
from qjax.core.tree import flatten_params as flatten_params
from qjax.core.tree import leaves_with_paths as leaves_with_paths
from qjax.core.tree import map_with_path as map_with_path
from qjax.core.tree import unflatten_params as unflatten_params

__all__ = [
  "AffineGrid",
  "ClipSearch",
  "Fp8Grid",
  "GgmlGrid",
  "Grid",
  "GroupParams",
  "InputError",
  "MxFp4Grid",
  "NvFp4Grid",
  "PerTensorGrid",
  "QArray",
  "QSpec",
  "TensorGrid",
  "dequantize",
  "flatten_params",
  "from_codes",
  "grid_values",
  "is_qarray",
  "leaves_with_paths",
  "map_with_path",
  "pack",
  "quantize",
  "round_to_grid",
  "unflatten_params",
  "unpack",
]
