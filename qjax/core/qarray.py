"""`QArray`: a quantized matrix as a pytree of stored codes, grid parameters and an input permutation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer

from qjax.core import packing
from qjax.core.affine import ClipSearch
from qjax.core.grid import Grid, GroupParams
from qjax.core.qspec import KERNEL, PACKED, QSpec

KERNEL_BIAS = 8
"""``2**(bits-1)`` of 4-bit codes: the kernel layout stores ``q - 8`` and ``z - 8``."""


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized 2-D weight; an ordinary pytree, so it can sit in a Flax param tree.

  A stack of them (a mixture of experts' kernels) is one QArray whose array leaves carry the stack's axes in front,
  as `jax.vmap` returns it; `shape` stays one matrix's (`stack_shape`).

  The quantized matrix is kept in *canonical* orientation ``(k, n)``: ``k`` is the contraction axis, along which
  groups (or ggml blocks) run, and ``n`` the output axis. A Flax ``Dense`` kernel ``[in, out]`` has ``axis=0``
  (canonical = logical); an embedding table ``[vocab, hidden]`` quantized along ``hidden`` has ``axis=1``.

  Attributes:
    codes: by ``spec.layout``: ``packed``: (k * bits / 32, n) uint32, codes packed along ``k``
      (`qjax.core.packing`); ``kernel_int4``: (n, k) int4 ``q - 8``; a ggml type: (n, k / block_size *
      type_size) uint8, one row of ggml blocks per output channel, exactly as stored in a GGUF file.
    scale: the grid's ``GroupParams.scale``: (groups, n) `spec.scale_dtype` for the affine grid, or None for
      ggml layouts (the scales are inside the blocks).
    zero: the grid's ``GroupParams.zero``: (groups, n) int32 zero points (``kernel_int4``: ``z - 8`` in the
      scale dtype), or None.
    perm: (k,) int32 or None. Act-order: row ``r`` of the codes and groups holds input channel ``perm[r]``, so
      groups are contiguous runs of the permuted order.
    spec: the `QSpec` (static): grid, group size, layout.
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
  def stack_shape(self) -> tuple[int, ...]:
    """The leading axes of a stack of matrices (every layout's codes are 2-D per matrix); () for one matrix."""
    return tuple(self.codes.shape[:-2])

  @property
  def ndim(self) -> int:
    return 2 + len(self.stack_shape)

  @property
  def size(self) -> int:
    """Weights it stands for (every matrix of a stack)."""
    return int(np.prod(self.shape) * np.prod(self.stack_shape))

  @property
  def params(self) -> GroupParams:
    return GroupParams(self.scale, self.zero)

  @property
  def nbytes(self) -> int:
    """Bytes of storage (codes, scales, zeros, permutation)."""
    leaves = [x for x in (self.codes, self.scale, self.zero, self.perm) if x is not None]
    leaves = [leaf for x in leaves for leaf in jax.tree.leaves(x)]
    return sum(int(np.prod(x.shape)) * _storage_bits(x.dtype) // 8 for x in leaves)

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.nbytes / self.size


def _storage_bits(dtype) -> int:
  return 4 if np.dtype(dtype) == np.dtype(jnp.int4) else 8 * np.dtype(dtype).itemsize


jax.tree_util.register_dataclass(
  QArray, data_fields=["codes", "scale", "zero", "perm"], meta_fields=["spec", "shape", "dtype", "axis"]
)


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def group_view(w: Float[Array, "k n"], spec: QSpec) -> Float[Array, "groups group n"]:
  """Splits the contraction axis into (groups, group_size), zero-padding a shorter last group.

  Zero padding leaves an affine group's grid unchanged: the range always includes 0, and 0 is exactly
  representable (its code is the integer zero point).
  """
  k, n = w.shape
  pad = spec.padded_length(k) - k
  if pad:
    w = jnp.concatenate([w, jnp.zeros((pad, n), w.dtype)])
  return w.reshape(spec.num_groups(k), spec.group_length(k), n)


def ungroup(x: Array, in_features: int) -> Array:
  """Inverse of `group_view`: (groups, group, n) -> (k, n), dropping the padding."""
  return x.reshape(-1, x.shape[-1])[:in_features]


def clipped_grid(spec: QSpec, clip: ClipSearch | None) -> Grid:
  """`spec`'s grid, with `clip`'s MSE clipping search in its fit (affine grids only)."""
  grid = spec.rounding_grid
  if clip is None:
    return grid
  if not hasattr(grid, "clip"):
    raise ValueError(f"a clip search applies to the affine grid, got {type(grid).__name__}.")
  return dataclasses.replace(grid, clip=clip)


def _check_groups(fn: str, w: Array, spec: QSpec) -> None:
  if w.ndim != 2:
    raise ValueError(f"`{fn}` expected a 2-D (k, n) matrix, got {w.shape=}.")
  spec.check_divides(fn, w.shape[0], w.shape)
  if spec.is_ggml:
    raise ValueError(f"`{fn}` stores codes bit-packed; for ggml layout {spec.layout} use `kquant_quantize`.")


def round_to_grid(
  w: Float[Array, "k n"], spec: QSpec, *, clip: ClipSearch | None = None, importance: Array | None = None
) -> tuple[Integer[Array, "k n"], GroupParams]:
  """Round-to-nearest on `spec`'s grid, group-wise along ``k``: fit each group, then round it.

  Args:
    w: (k, n) float; groups of `spec.group_size` run along ``k``.
    spec: the grid and group size.
    clip: optional MSE clipping search (affine grids).
    importance: optional (k,) importance of each input channel, for grids whose fit uses it.

  Returns:
    codes: (k, n) uint8 in ``[0, 2**bits)``.
    params: the grid's `GroupParams`, e.g. (groups, n) scale and zero.

  Raises:
    ValueError: if the group size does not divide ``k`` or `w` is not 2-D.

  Examples:
    >>> import numpy as np
    >>> codes, params = round_to_grid(np.linspace(-1, 1, 8, dtype=np.float32)[:, None],
    ...                               QSpec(bits=2, group_size=-1, scale_dtype=np.float32))
    >>> codes[:, 0].tolist(), params.scale.tolist()
    ([0, 1, 1, 2, 2, 3, 3, 3], [[0.6666666865348816]])
  """
  _check_groups("round_to_grid", w, spec)
  grouped = group_view(jnp.asarray(w, jnp.float32), spec)
  grid = clipped_grid(spec, clip)
  weights = None if importance is None else group_view(jnp.asarray(importance, jnp.float32)[:, None], spec)[..., 0]
  params = grid.fit(grouped, weights)
  codes, _ = grid.round(grouped, params, jnp.arange(grouped.shape[1]))
  return ungroup(codes.astype(jnp.uint8), w.shape[0]), params


def grid_values(codes: Integer[Array, "k n"], params: GroupParams, spec: QSpec) -> Float[Array, "k n"]:
  """Inverse of `round_to_grid`: the float32 values of (k, n) codes on `spec`'s grid."""
  grouped = group_view(codes, spec)
  return ungroup(spec.rounding_grid.dequantize(grouped, params, jnp.arange(grouped.shape[1])), codes.shape[0])


def from_codes(
  codes: Array,
  params: GroupParams,
  spec: QSpec,
  *,
  perm: Array | None = None,
  dtype: jnp.dtype = jnp.float32,
  axis: int = 0,
) -> QArray:
  """Packs canonical ``(k, n)`` codes into a ``packed`` `QArray`.

  Args:
    codes: (k, n) integer codes in ``[0, 2**bits)``; with `perm`, row ``r`` holds input channel ``perm[r]``.
    params: the grid's parameters, groups contiguous in the codes' row order.
    spec: the spec the codes were made with (``packed`` layout).
    perm: optional (k,) act-order permutation.
    dtype: dtype of the dequantized matrix.
    axis: contraction axis of the logical matrix.
  """
  if spec.layout != PACKED:
    raise ValueError(f"`from_codes` builds the {PACKED} layout, got {spec.layout=}.")
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


def unpacked_codes(q: QArray) -> Integer[Array, "k n"]:
  """(k, n) uint8 codes of a ``packed`` or ``kernel_int4`` QArray, in its (possibly permuted) row order."""
  if q.spec.layout == KERNEL:
    return (q.codes.T.astype(jnp.int8) + KERNEL_BIAS).astype(jnp.uint8)
  return packing.unpack(q.codes, q.spec.bits, axis=0)


def grid_params(q: QArray) -> GroupParams:
  """The grid's parameters of a ``packed`` or ``kernel_int4`` QArray (the kernel layout's ``z - 8`` undone)."""
  if q.spec.layout == KERNEL and q.zero is not None:
    return GroupParams(q.scale, q.zero.astype(jnp.int32) + KERNEL_BIAS)
  return q.params


def dequantize_canonical(q: QArray) -> Float[Array, "k n"]:
  """The dense matrix in canonical ``(k, n)`` orientation and original row order, float32."""
  if q.spec.is_ggml:
    from qjax.core import ggml_decode

    return ggml_decode.decode(q.codes, q.spec.layout).T
  w = grid_values(unpacked_codes(q), grid_params(q), q.spec)
  if q.perm is not None:
    w = jnp.zeros_like(w).at[q.perm].set(w)
  return w


def dequantize(q: QArray) -> Array:
  """The dense matrix, in its logical shape and dtype.

  Examples:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> q = quantize(w, QSpec(bits=8, group_size=32))
    >>> bool(np.abs(np.asarray(dequantize(q)) - w).max() < 0.03)
    True
  """
  if q.stack_shape:  # a stack: (*stack_shape, *shape)
    return jax.vmap(dequantize)(q)
  w = dequantize_canonical(q)
  return (w if q.axis == 0 else w.T).astype(q.dtype)


def quantize(w: Array, spec: QSpec, *, axis: int = 0, clip: ClipSearch | None = None) -> QArray:
  """Round-to-nearest quantization of a 2-D array into a ``packed`` `QArray`.

  Args:
    w: 2-D float array; groups run along `axis`.
    spec: the grid, group size and ``packed`` layout; a per-tensor grid parameter not yet set (NVFP4's global
      scale) is fixed from `w` (`QSpec.for_tensor`).
    axis: the contraction axis (0 for a Dense kernel ``[in, out]``).
    clip: optional MSE clipping search (affine grids).
  """
  w = jnp.asarray(w)
  spec = spec.for_tensor(jnp.max(jnp.abs(w))) if spec.needs_tensor_fit else spec
  canonical = w if axis == 0 else w.T
  codes, params = round_to_grid(canonical, spec, clip=clip)
  return from_codes(codes, params, spec, dtype=w.dtype, axis=axis)
