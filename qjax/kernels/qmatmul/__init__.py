"""Quantized matmul: the reference, the XLA int4 baseline, the Pallas kernels and the kernel weight layout."""

from qjax.kernels.qmatmul.layout import from_kernel_layout as from_kernel_layout
from qjax.kernels.qmatmul.layout import from_kernel_layout_params as from_kernel_layout_params
from qjax.kernels.qmatmul.layout import is_kernel_layout as is_kernel_layout
from qjax.kernels.qmatmul.layout import to_kernel_layout as to_kernel_layout
from qjax.kernels.qmatmul.layout import to_kernel_layout_params as to_kernel_layout_params
from qjax.kernels.qmatmul.pallas_hopper import HopperConfig as HopperConfig
from qjax.kernels.qmatmul.pallas_hopper import qmatmul_hopper as qmatmul_hopper
from qjax.kernels.qmatmul.pallas_portable import PortableConfig as PortableConfig
from qjax.kernels.qmatmul.pallas_portable import qmatmul_portable as qmatmul_portable
from qjax.kernels.qmatmul.pallas_tpu import TpuConfig as TpuConfig
from qjax.kernels.qmatmul.pallas_tpu import qmatmul_tpu as qmatmul_tpu
from qjax.kernels.qmatmul.reference import qmatmul_reference as qmatmul_reference
from qjax.kernels.qmatmul.xla_int4 import qmatmul_xla_int4 as qmatmul_xla_int4

__all__ = [
  "HopperConfig",
  "PortableConfig",
  "TpuConfig",
  "from_kernel_layout",
  "from_kernel_layout_params",
  "is_kernel_layout",
  "qmatmul_hopper",
  "qmatmul_portable",
  "qmatmul_reference",
  "qmatmul_tpu",
  "qmatmul_xla_int4",
  "to_kernel_layout",
  "to_kernel_layout_params",
]
