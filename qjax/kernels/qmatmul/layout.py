"""`KernelWeight`: a 4-bit `QArray` pre-shuffled for the GPU kernels, and the conversions both ways.

The interchange layout (`QArray`, ``packed``) stores codes as uint32 words along the
contraction axis, ``(k / 8, n)``, GPTQ's qweight order. The Hopper kernel and the XLA
int4 baseline instead want one signed 4-bit code per element, transposed to ``(n, k)``
so that a weight tile's contraction runs along the minor axis: that tile is the register
operand of ``wgmma`` after swapping A and B (see `pallas_hopper`), and a native int4
array XLA can convert inside its GEMM fusion.

A code ``q`` in ``[0, 16)`` becomes ``c = q - 8`` in ``[-8, 8)`` (a ``jnp.int4``), and the
zero point ``z`` becomes ``z - 8``, stored in the scale dtype (exact: small integers), so
the weight is ``s * (c - (z - 8)) = s * (q - z)`` as before. Symmetric specs have
``z = 8``, so no zero is stored and the weight is ``s * c``.

Convert once at quantize time (`to_kernel_layout_params`); `qjax.kernels.qmatmul` accepts
either type. Exporters take `QArray`s: convert back with `from_kernel_layout_params` (or
`from_kernel_layout`), which is exact. The `QArray` data model itself is unchanged.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from qjax.core import QArray, QSpec, is_qarray
from qjax.core.packing import pack
from qjax.core.qarray import unpacked_codes

_BIAS = 8  # 2**(bits - 1) for 4-bit codes: the symmetric zero point


@dataclasses.dataclass(frozen=True)
class KernelWeight:
  """A 4-bit ``packed`` `QArray` in the kernels' layout; a pytree like `QArray`.

  Attributes:
    w: (n, k) int4 signed codes ``q - 8``, in the row order of the source `QArray`
      (act-order permuted when `perm` is set).
    scale: (groups, n) `spec.scale_dtype`, as in the `QArray`.
    zero: (groups, n) `spec.scale_dtype` holding ``z - 8``, or None for symmetric specs.
    perm: (k,) int32 act-order permutation, or None (same meaning as `QArray.perm`).
    spec: the source `QSpec` (static).
    shape: logical shape of the dense matrix (static).
    dtype: dtype the dense matrix dequantizes to (static).
    axis: logical contraction axis (static).
  """

  w: Array
  scale: Array
  zero: Array | None
  perm: Array | None
  spec: QSpec
  shape: tuple[int, int]
  dtype: np.dtype
  axis: int = 0

  @property
  def canonical_shape(self) -> tuple[int, int]:
    """``(k, n)``: contraction length and output length."""
    return self.shape if self.axis == 0 else self.shape[::-1]


jax.tree_util.register_dataclass(
  KernelWeight, data_fields=["w", "scale", "zero", "perm"], meta_fields=["spec", "shape", "dtype", "axis"]
)


def is_kernel_weight(x) -> bool:
  return isinstance(x, KernelWeight)


def layout_reason(q) -> str | None:
  """Why `q` has no kernel layout (only 4-bit ``packed`` `QArray`s with whole groups have one), or None."""
  if not is_qarray(q):
    return f"expected a QArray, got {type(q).__name__}"
  spec, k = q.spec, q.canonical_shape[0]
  if spec.is_ggml:
    return f"ggml layout {spec.layout} has no kernel layout"
  if spec.bits != 4:
    return f"only 4-bit codes have a kernel layout, got bits={spec.bits}"
  if spec.group_size != -1 and k % spec.group_size:
    return f"a shorter last group (k={k}, group_size={spec.group_size}) has no kernel layout"
  return None


def convertible(q: QArray) -> bool:
  """True if `q` has a kernel layout: 4-bit ``packed`` codes with whole groups."""
  return layout_reason(q) is None


def to_kernel_layout(q: QArray) -> KernelWeight:
  """Converts a 4-bit ``packed`` `QArray` to a `KernelWeight` (exact; jit-able).

  Raises:
    ValueError: for other bit widths, ggml layouts, or a shorter last group.

  Examples:
    >>> import numpy as np
    >>> from qjax.core import QSpec, quantize
    >>> q = quantize(np.ones((64, 16), np.float32), QSpec(bits=4, group_size=32))
    >>> kw = to_kernel_layout(q)
    >>> kw.w.shape, str(kw.w.dtype), kw.scale.shape
    ((16, 64), 'int4', (2, 16))
  """
  reason = layout_reason(q)
  if reason:
    raise ValueError(f"`to_kernel_layout` expected a 4-bit packed QArray with whole groups: {reason}.")
  codes = unpacked_codes(q).astype(jnp.int8) - _BIAS
  zero = None if q.zero is None else (q.zero - _BIAS).astype(q.scale.dtype)
  return KernelWeight(codes.T.astype(jnp.int4), q.scale, zero, q.perm, q.spec, q.shape, q.dtype, q.axis)


def from_kernel_layout(kw: KernelWeight) -> QArray:
  """The `QArray` a `KernelWeight` was converted from (exact inverse of `to_kernel_layout`)."""
  codes = kw.w.T.astype(jnp.int8) + _BIAS
  zero = None if kw.zero is None else kw.zero.astype(jnp.int32) + _BIAS
  return QArray(pack(codes, 4, axis=0), kw.scale, zero, kw.perm, kw.spec, kw.shape, kw.dtype, kw.axis)


def to_kernel_layout_params(params):
  """Converts every convertible `QArray` leaf of a parameter tree (others are unchanged)."""
  convert = lambda x: to_kernel_layout(x) if is_qarray(x) and convertible(x) else x
  return jax.tree.map(convert, params, is_leaf=is_qarray)


def from_kernel_layout_params(params):
  """Converts every `KernelWeight` leaf back to a `QArray`, e.g. before export."""
  convert = lambda x: from_kernel_layout(x) if is_kernel_weight(x) else x
  return jax.tree.map(convert, params, is_leaf=is_kernel_weight)
