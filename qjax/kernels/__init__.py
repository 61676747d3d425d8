"""Quantized matmul kernels and their dispatch."""

from qjax.kernels.grouped import grouped_matmul as grouped_matmul
from qjax.kernels.ops import BACKENDS as BACKENDS
from qjax.kernels.ops import choose_backend as choose_backend
from qjax.kernels.ops import qmatmul as qmatmul
from qjax.kernels.ops import qmatmul_mode as qmatmul_mode
from qjax.kernels.qmatmul.layout import from_kernel_layout as from_kernel_layout
from qjax.kernels.qmatmul.layout import from_kernel_layout_params as from_kernel_layout_params
from qjax.kernels.qmatmul.layout import is_kernel_layout as is_kernel_layout
from qjax.kernels.qmatmul.layout import to_kernel_layout as to_kernel_layout
from qjax.kernels.qmatmul.layout import to_kernel_layout_params as to_kernel_layout_params
from qjax.kernels.qmatmul.reference import qmatmul_reference as qmatmul_reference

__all__ = [
  "BACKENDS",
  "choose_backend",
  "from_kernel_layout",
  "from_kernel_layout_params",
  "grouped_matmul",
  "is_kernel_layout",
  "qmatmul",
  "qmatmul_mode",
  "qmatmul_reference",
  "to_kernel_layout",
  "to_kernel_layout_params",
]
