"""`QArray`: a quantized matrix as a pytree of packed codes, scales, zeros and a permutation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from qjax.core import affine, packing
from qjax.core.qspec import QSpec


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized 2-D weight; an ordinary pytree, so it can sit in a Flax param tree.

  The quantized matrix is kept in *canonical* orientation ``(k, n)``: ``k`` is the
  contraction axis, along which groups (or ggml blocks) run, and ``n`` the output axis.
  A Flax ``Dense`` kernel ``[in, out]`` has ``axis=0`` (canonical = logical); an
  embedding table ``[vocab, hidden]`` quantized along ``hidden`` has ``axis=1``.

  Attributes:
    codes: ``packed`` layout: (k * bits / 32, n) uint32, codes packed along ``k``
      (`qjax.core.packing`). ggml layouts: (n, k / block_size * type_size) uint8,
      one row of ggml blocks per output channel, exactly as stored in a GGUF file.
    scale: (k / group_size, n) `spec.scale_dtype`, or None for ggml layouts.
    zero: (k / group_size, n) int32 zero points, or None (symmetric or ggml).
    perm: (k,) int32 or None. Act-order: row ``r`` of the codes and groups holds input
      channel ``perm[r]``, so groups are contiguous runs of the permuted order.
    spec: the `QSpec` (static).
    shape: logical shape of the dense matrix (static).
    dtype: dtype `dequantize` returns (static).
    axis: which logical axis is the contraction axis ``k`` (static, 0 or 1).
  """

  codes: Array
  scale: Array | None
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

  @property
  def ndim(self) -> int:
    return 2

  @property
  def nbytes(self) -> int:
    """Bytes of storage (codes, scales, zeros, permutation)."""
    parts = (self.codes, self.scale, self.zero, self.perm)
    return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in parts if p is not None)

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.nbytes / int(np.prod(self.shape))


jax.tree_util.register_dataclass(
  QArray, data_fields=["codes", "scale", "zero", "perm"], meta_fields=["spec", "shape", "dtype", "axis"]
)


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def from_codes(
  codes: Array,
  params: affine.AffineParams,
  spec: QSpec,
  *,
  perm: Array | None = None,
  dtype: jnp.dtype = jnp.float32,
  axis: int = 0,
) -> QArray:
  """Packs canonical ``(k, n)`` affine codes into a `QArray`.

  Args:
    codes: (k, n) integer codes in ``[0, 2**bits)``; with `perm`, row ``r`` holds input
      channel ``perm[r]``.
    params: (groups, n) scale and zero, groups contiguous in the codes' row order.
    spec: the spec the codes were made with (``packed`` layout).
    perm: optional (k,) act-order permutation.
    dtype: dtype of the dequantized matrix.
    axis: contraction axis of the logical matrix.
  """
  k, n = codes.shape
  shape = (k, n) if axis == 0 else (n, k)
  return QArray(
    codes=packing.pack(codes, spec.bits, axis=0),
    scale=params.scale,
    zero=params.zero,
    perm=None if perm is None else jnp.asarray(perm, jnp.int32),
    spec=spec,
    shape=shape,
    dtype=np.dtype(dtype),
    axis=axis,
  )


def unpacked_codes(q: QArray) -> Array:
  """(k, n) uint8 codes of a ``packed`` QArray, in its (possibly permuted) row order."""
  return packing.unpack(q.codes, q.spec.bits, axis=0)


def dequantize_canonical(q: QArray) -> Float[Array, "k n"]:
  """The dense matrix in canonical ``(k, n)`` orientation and original row order, float32."""
  if q.spec.is_ggml:
    from qjax.core import ggml_decode

    return ggml_decode.decode(q.codes, q.spec.layout).T
  w = affine.dequantize(unpacked_codes(q), affine.AffineParams(q.scale, q.zero), q.spec)
  if q.perm is not None:
    w = jnp.zeros_like(w).at[q.perm].set(w)
  return w


def dequantize(q: QArray) -> Array:
  """The dense matrix, in its logical shape and dtype.

  Examples:
    >>> import numpy as np
    >>> from qjax.core.qspec import QSpec
    >>> w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> q = quantize(w, QSpec(bits=8, group_size=32))
    >>> bool(np.abs(np.asarray(dequantize(q)) - w).max() < 0.03)
    True
  """
  w = dequantize_canonical(q)
  return (w if q.axis == 0 else w.T).astype(q.dtype)


def quantize(w: Array, spec: QSpec, *, axis: int = 0, clip: affine.ClipSearch | None = None) -> QArray:
  """Round-to-nearest quantization of a 2-D array into a `QArray`.

  Args:
    w: 2-D float array; groups run along `axis`.
    spec: a ``packed``-layout spec.
    axis: the contraction axis (0 for a Dense kernel ``[in, out]``).
    clip: optional MSE clipping search.
  """
  w = jnp.asarray(w)
  canonical = w if axis == 0 else w.T
  codes, params = affine.quantize(canonical, spec, clip=clip)
  return from_codes(codes, params, spec, dtype=w.dtype, axis=axis)
