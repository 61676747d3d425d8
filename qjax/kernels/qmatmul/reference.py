"""Reference W·x for a `QArray`: dequantize, then a float32-accumulated dot. The oracle every kernel matches."""

import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core import QArray
from qjax.core.qarray import dequantize_canonical


def qmatmul_reference(x: Float[Array, "... k"], q: QArray) -> Float[Array, "... n"]:
  """``x @ W`` contracting `x`'s last axis with `q`'s contraction axis.

  Args:
    x: (..., k) float32|bfloat16|float16 activations.
    q: a `QArray` whose canonical shape is (k, n): a Dense kernel ``[in, out]``, or an
      embedding ``[vocab, hidden]`` quantized along hidden (a tied output head).

  Returns:
    (..., n) in `x.dtype`, accumulated in float32.
  """
  w = dequantize_canonical(q).astype(x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
