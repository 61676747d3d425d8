"""Quantized matmul kernels and their dispatch."""

from qjax.kernels.ops import qmatmul as qmatmul
from qjax.kernels.qmatmul.reference import qmatmul_reference as qmatmul_reference

__all__ = ["qmatmul", "qmatmul_reference"]
