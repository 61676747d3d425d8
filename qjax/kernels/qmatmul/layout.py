"""The kernel layout of a 4-bit `QArray` (``spec.layout == "kernel_int4"``), and the conversions both ways.

The interchange layout (``packed``) stores codes as uint32 words along the contraction axis,
``(k / 8, n)``, GPTQ's qweight order. The Hopper kernel and the XLA int4 baseline instead want
one signed 4-bit code per element, transposed to ``(n, k)`` so that a weight tile's
contraction runs along the minor axis: that tile is the register operand of ``wgmma`` after
swapping A and B (see `pallas_hopper`), and a native int4 array XLA can convert inside its
GEMM fusion.

A code ``q`` in ``[0, 16)`` becomes ``c = q - 8`` in ``[-8, 8)`` (a ``jnp.int4``), and the
zero point ``z`` becomes ``z - 8``, stored in the scale dtype (exact: small integers), so
the weight is ``s * (c - (z - 8)) = s * (q - z)`` as before. Symmetric specs have
``z = 8``, so no zero is stored and the weight is ``s * c``.

Convert once at quantize time (`to_kernel_layout_params`); `qjax.kernels.qmatmul` accepts
either layout. Exporters take the ``packed`` layout: convert back with
`from_kernel_layout_params` (or `from_kernel_layout`), which is exact.
"""

import dataclasses

import jax
import jax.numpy as jnp

from qjax.core import QArray, is_qarray
from qjax.core.packing import pack
from qjax.core.qarray import KERNEL_BIAS, unpacked_codes
from qjax.core.qspec import KERNEL, PACKED


def is_kernel_layout(x) -> bool:
  """True for a `QArray` in the kernel layout."""
  return is_qarray(x) and x.spec.layout == KERNEL


def layout_reason(q) -> str | None:
  """Why `q` has no kernel layout (only 4-bit ``packed`` affine `QArray`s with whole groups have one), or None."""
  if not is_qarray(q):
    return f"expected a QArray, got {type(q).__name__}"
  spec, k = q.spec, q.canonical_shape[0]
  if spec.layout != PACKED:
    return f"layout {spec.layout} has no kernel layout"
  if spec.bits != 4 or not spec.has_default_grid:
    return f"only 4-bit codes on the affine grid have a kernel layout, got bits={spec.bits}, grid {spec.rounding_grid}"
  if spec.group_size != -1 and k % spec.group_size:
    return f"a shorter last group (k={k}, group_size={spec.group_size}) has no kernel layout"
  return None


def convertible(q: QArray) -> bool:
  """True if `q` has a kernel layout: 4-bit ``packed`` codes with whole groups."""
  return layout_reason(q) is None


def to_kernel_layout(q: QArray) -> QArray:
  """Converts a 4-bit ``packed`` `QArray` to the ``kernel_int4`` layout (exact; jit-able).

  Raises:
    ValueError: for other bit widths, ggml layouts, or a shorter last group.

  Examples:
    >>> import numpy as np
    >>> from qjax.core import QSpec, quantize
    >>> q = quantize(np.ones((64, 16), np.float32), QSpec(bits=4, group_size=32))
    >>> kw = to_kernel_layout(q)
    >>> kw.codes.shape, str(kw.codes.dtype), kw.scale.shape, kw.spec.layout
    ((16, 64), 'int4', (2, 16), 'kernel_int4')
  """
  if is_kernel_layout(q):
    return q
  reason = layout_reason(q)
  if reason:
    raise ValueError(f"`to_kernel_layout` expected a 4-bit packed QArray with whole groups: {reason}.")
  codes = unpacked_codes(q).astype(jnp.int8) - KERNEL_BIAS
  zero = None if q.zero is None else (q.zero - KERNEL_BIAS).astype(q.scale.dtype)
  spec = dataclasses.replace(q.spec, layout=KERNEL)
  return dataclasses.replace(q, codes=codes.T.astype(jnp.int4), zero=zero, spec=spec)


def from_kernel_layout(q: QArray) -> QArray:
  """The ``packed`` `QArray` a kernel-layout one was converted from (exact inverse of `to_kernel_layout`)."""
  if not is_kernel_layout(q):
    return q
  zero = None if q.zero is None else q.zero.astype(jnp.int32) + KERNEL_BIAS
  codes = pack(unpacked_codes(q), 4, axis=0)
  return dataclasses.replace(q, codes=codes, zero=zero, spec=dataclasses.replace(q.spec, layout=PACKED))


def to_kernel_layout_params(params):
  """Converts every convertible `QArray` leaf of a parameter tree (others are unchanged)."""
  convert = lambda x: to_kernel_layout(x) if is_qarray(x) and convertible(x) else x
  return jax.tree.map(convert, params, is_leaf=is_qarray)


def from_kernel_layout_params(params):
  """Converts every kernel-layout leaf back to the ``packed`` layout, e.g. before export."""
  return jax.tree.map(from_kernel_layout, params, is_leaf=is_qarray)
