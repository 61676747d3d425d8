"""The XLA baseline: native ``jnp.int4`` weights, dequantize-and-dot written in plain jnp for XLA to fuse.

This is what a user writes without a custom kernel (and what tpu-inference does for AWQ):
convert the int4 codes, shift by the zero, scale per group, ``einsum``. On GPU, XLA's
Triton GEMM emitter fuses the ``s4`` convert into the matmul; whether the group-wise
scale multiply fuses too depends on XLA flags (``--xla_gpu_experimental_enable_
subchannel_dequantisation_fusion``, off by default), otherwise XLA materializes the
dequantized weight in the activation dtype. It is the comparison point of
``scripts/bench_kernels.py`` and the fallback for shapes the Pallas kernels do not take.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core import QArray
from qjax.kernels.qmatmul import common


def supported(x, w: QArray) -> bool:
  """True for a kernel-layout `QArray` (any group size that divides k) and a float activation of matching width.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qjax.core import QSpec, quantize
    >>> from qjax.kernels.qmatmul.layout import to_kernel_layout
    >>> w = jax.eval_shape(lambda: to_kernel_layout(quantize(jnp.ones((64, 8)), QSpec(group_size=32))))
    >>> supported(jax.ShapeDtypeStruct((2, 64), jnp.float16), w)
    True
  """
  return common.packed_int4_reason(w) is None and common.activation_reason(x, w.canonical_shape[0]) is None


# Jitted so that identical calls (every layer of a model) are traced and lowered once.
@jax.jit
def qmatmul_xla_int4(x: Float[Array, "... k"], w: QArray) -> Float[Array, "... n"]:
  """``x @ W`` from int4 codes, dequantized in `x.dtype` by XLA; same contract as `qmatmul_reference`.

  Args:
    x: (..., k) float32|bfloat16|float16 activations.
    w: a kernel-layout `QArray` of canonical shape (k, n).

  Returns:
    (..., n) in `x.dtype`, accumulated in float32.
  """
  common.check_inputs("qmatmul_xla_int4", x, w)
  k, n = w.canonical_shape
  groups = w.scale.shape[0]
  x = common.permute_activations(x, w.perm)
  codes = w.codes.astype(x.dtype).reshape(n, groups, k // groups)
  if w.zero is not None:
    codes = codes - w.zero.T.astype(x.dtype)[:, :, None]
  dense = (codes * w.scale.T.astype(x.dtype)[:, :, None]).reshape(n, k)
  return jnp.einsum("...k,nk->...n", x, dense, preferred_element_type=jnp.float32).astype(x.dtype)
