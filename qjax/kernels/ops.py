"""Public quantized ops: choose a kernel by platform and shape, else the reference."""

from jaxtyping import Array, Float

from qjax.core import QArray
from qjax.kernels.qmatmul.reference import qmatmul_reference


def qmatmul(x: Float[Array, "... k"], q: QArray) -> Float[Array, "... n"]:
  """``x @ W`` for a quantized ``W`` (canonical (k, n)); see `qmatmul_reference` for the contract."""
  return qmatmul_reference(x, q)
