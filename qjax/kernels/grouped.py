"""Grouped matmuls over rows sorted by expert (`qjax.core.grouped.GroupedRows`): every expert's kernel applied to
its own rows (`grouped_matmul`), and every expert's Gram matrix of its rows (`grouped_gram`, calibration's
per-expert Hessians).

Each has two methods: ``"tiles"``, a loop over tiles, each one expert's dense matmul, what CPUs run well (XLA's CPU
ragged dot computes every group densely: E times the work); and ``"ragged"``, `jax.lax.ragged_dot_general`, what
accelerators implement as grouped kernels (megablox's gmm and its transposed form on TPU). The default is by
platform.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core import QArray, dequantize, is_qarray
from qjax.core.grouped import GroupedRows
from qjax.kernels.ops import qmatmul

_HIGHEST = jax.lax.Precision.HIGHEST


def expert_kernel(w: Array | QArray, e: Array) -> Array | QArray:
  """Expert `e`'s (in, out) kernel of a stack (dense (E, in, out), or a QArray with the expert axis in front)."""
  return jax.tree.map(lambda leaf: jnp.asarray(leaf)[e], w) if is_qarray(w) else jnp.asarray(w)[e]


def _default_method() -> str:
  return "tiles" if jax.default_backend() == "cpu" else "ragged"


def grouped_matmul(rows: GroupedRows, w: Array | QArray, *, method: str | None = None) -> Float[Array, "r out"]:
  """``y_r = x_r @ w[expert(r)]`` for every row; padding rows give zeros.

  Args:
    rows: the grouped rows.
    w: (E, in, out) kernels, dense or a stacked `QArray`.
    method: ``"tiles"`` (a scan over tiles, each one expert's matmul: what CPUs run well) or ``"ragged"``
      (`jax.lax.ragged_dot` on the padded groups: what accelerators implement); default by platform.
  """
  method = method or _default_method()
  if method == "ragged":
    dense = dequantize(w) if is_qarray(w) else w
    out = jax.lax.ragged_dot(rows.x, dense.astype(rows.x.dtype), rows.padded_sizes, preferred_element_type=jnp.float32)
    return out.astype(rows.x.dtype)

  def one_tile(args):
    x, e = args
    we = expert_kernel(w, e)
    if is_qarray(we):
      return qmatmul(x, we)
    return jnp.dot(x, we.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)

  out = jax.lax.map(one_tile, (rows.tiles(), rows.tile_expert))
  return out.reshape(rows.x.shape[0], -1)


def grouped_gram(rows: GroupedRows, num_experts: int, *, method: str | None = None) -> Float[Array, "e d d"]:
  """``G_e = X_eᵀ X_e`` of every expert's rows, float32 at full precision (padding rows add nothing).

  Args:
    rows: the grouped rows (d wide).
    num_experts: E.
    method: ``"tiles"`` (a scan over tiles, each added into its expert's slot in place) or ``"ragged"``
      (`jax.lax.ragged_dot_general` with the rows as the ragged contracting dimension); default by platform.
  """
  x = rows.x.astype(jnp.float32)
  if (method or _default_method()) == "ragged":
    dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [0]), ([], [])), lhs_ragged_dimensions=[1], rhs_group_dimensions=[]
    )
    sizes = rows.padded_sizes.at[-1].add(x.shape[0] - jnp.sum(rows.padded_sizes))  # trailing tiles: padding
    return jax.lax.ragged_dot_general(x.T, x, sizes, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)

  def tile(acc, args):
    t, e = args
    return acc.at[e].add(jnp.dot(t.T, t, precision=_HIGHEST)), None

  empty = jnp.zeros((num_experts, x.shape[-1], x.shape[-1]), jnp.float32)
  return jax.lax.scan(tile, empty, (rows.replace_x(x).tiles(), rows.tile_expert))[0]
