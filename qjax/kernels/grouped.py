"""Grouped matmul: every expert's kernel applied to its own rows (`qjax.core.grouped.GroupedRows`)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core import QArray, dequantize, is_qarray
from qjax.core.grouped import GroupedRows, default_method, scan_tiles
from qjax.kernels.ops import qmatmul


def expert_kernel(w: Array | QArray, e: Array) -> Array | QArray:
  """Expert `e`'s (in, out) kernel of a stack (dense (E, in, out), or a QArray with the expert axis in front)."""
  return jax.tree.map(lambda leaf: jnp.asarray(leaf)[e], w) if is_qarray(w) else jnp.asarray(w)[e]


def grouped_matmul(rows: GroupedRows, w: Array | QArray, *, method: str | None = None) -> Float[Array, "r out"]:
  """``y_r = x_r @ w[expert(r)]`` for every row; padding rows give zeros.

  Args:
    rows: the grouped rows.
    w: (E, in, out) kernels, dense or a stacked `QArray`.
    method: ``"tiles"`` (a scan over tiles, each one expert's matmul: what CPUs run well) or ``"ragged"``
      (`jax.lax.ragged_dot` on the padded groups: what accelerators implement); default by platform.
  """
  method = method or default_method()
  if method == "ragged":
    dense = dequantize(w) if is_qarray(w) else w
    out = jax.lax.ragged_dot(rows.x, dense.astype(rows.x.dtype), rows.padded_sizes, preferred_element_type=jnp.float32)
    return out.astype(rows.x.dtype)

  def one_tile(carry, x, e):
    we = expert_kernel(w, e)
    if is_qarray(we):
      return carry, qmatmul(x, we)
    return carry, jnp.dot(x, we.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)

  out = scan_tiles(one_tile, None, rows)[1]
  return out.reshape(rows.x.shape[0], -1)
