"""Group-wise affine (scale and zero point) quantization of a ``[in, out]`` matrix.

The grid follows GPTQ's quantizer, which GPTQ/AWQ checkpoints and their loaders assume:
with ``maxq = 2**bits - 1`` a group's codes are ``q = clip(round(w / s) + z, 0, maxq)``
and its values ``s * (q - z)``.

* Asymmetric: the range ``[min(w, 0), max(w, 0)]`` is split in ``maxq`` steps,
  ``s = (hi - lo) / maxq`` and ``z = round(-lo / s)``.
* Symmetric: ``z = 2**(bits-1)`` is fixed and ``s = 2 * max|w| / maxq``.
  (GPTQ's reference uses ``s = max(w) / maxq`` for a group without negative values,
  which then clips that group to half its range; qjax keeps the grid symmetric.)

Rounding is round-half-to-even, as `torch.round`. Scales are rounded to the spec's
`scale_dtype` before the codes are computed, so ``s * (q - z)`` is exactly what an
exporter stores.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

from qjax.core.qspec import QSpec


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ClipSearch:
  """MSE clipping search: shrink each group's range and keep the best shrink.

  Candidates are ``p = 1 - i / grid`` for ``i < max_shrink * grid`` (so ``p = 1``,
  plain RTN, is always a candidate); each group keeps the ``p`` that minimises
  ``sum |dequant(quant(w)) - w| ** norm``. Defaults are GPTQ's (``grid=100``,
  ``maxshrink=0.8``, ``norm=2.4``).
  """

  grid: int = 100
  max_shrink: float = 0.8
  norm: float = 2.4

  def __post_init__(self):
    if self.grid <= 0 or not 0.0 < self.max_shrink < 1.0 or self.norm <= 0:
      raise ValueError(f"`ClipSearch` expected grid > 0, 0 < max_shrink < 1, norm > 0, got {self}.")

  @property
  def num_candidates(self) -> int:
    return max(1, int(self.max_shrink * self.grid))


class AffineParams(NamedTuple):
  """Per-group quantization parameters.

  Attributes:
    scale: (groups, out) `spec.scale_dtype`.
    zero: (groups, out) int32 zero points, or None for symmetric specs.
  """

  scale: Array
  zero: Array | None


def max_code(bits: int) -> int:
  return (1 << bits) - 1


def symmetric_zero(bits: int) -> int:
  return 1 << (bits - 1)


def _check_groups(fn: str, w: Array, spec: QSpec) -> None:
  if w.ndim != 2:
    raise ValueError(f"`{fn}` expected a 2-D (in, out) matrix, got {w.shape=}.")
  spec.check_divides(fn, w.shape[0], w.shape)
  if spec.is_ggml:
    raise ValueError(f"`{fn}` handles the packed affine layout, got ggml layout {spec.layout}.")


def group_view(w: Float[Array, "in out"], spec: QSpec) -> Float[Array, "groups group out"]:
  """Splits the input axis into (groups, group_size), zero-padding a shorter last group.

  Zero padding leaves a group's grid unchanged: the range always includes 0, and 0 is
  exactly representable (its code is the integer zero point).
  """
  k, n = w.shape
  pad = spec.padded_length(k) - k
  if pad:
    w = jnp.concatenate([w, jnp.zeros((pad, n), w.dtype)])
  return w.reshape(spec.num_groups(k), spec.group_length(k), n)


def ungroup(x: Array, in_features: int) -> Array:
  """Inverse of `group_view`: (groups, group, out) -> (in, out), dropping the padding."""
  return x.reshape(-1, x.shape[-1])[:in_features]


def params_from_range(lo: Float[Array, "*g"], hi: Float[Array, "*g"], spec: QSpec) -> AffineParams:
  """Scale and zero of the grid spanning ``[lo, hi]`` (GPTQ's `find_params`)."""
  maxq = max_code(spec.bits)
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  if spec.symmetric:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  dead = (lo == 0.0) & (hi == 0.0)
  lo = jnp.where(dead, -1.0, lo)
  hi = jnp.where(dead, 1.0, hi)
  scale = ((hi - lo) / maxq).astype(spec.scale_dtype)
  if spec.symmetric:
    return AffineParams(scale, None)
  zero = jnp.clip(jnp.round(-lo / scale.astype(jnp.float32)), 0, maxq).astype(jnp.int32)
  return AffineParams(scale, zero)


def quantize_groups(
  w: Float[Array, "groups group out"], params: AffineParams, bits: int
) -> Integer[Array, "groups group out"]:
  """Codes of grouped weights on a given grid (no range search)."""
  maxq = max_code(bits)
  scale = params.scale.astype(jnp.float32)[:, None]
  zero = symmetric_zero(bits) if params.zero is None else params.zero[:, None]
  return jnp.clip(jnp.round(w / scale) + zero, 0, maxq).astype(jnp.uint8)


def dequantize_groups(
  codes: Integer[Array, "groups group out"], params: AffineParams, bits: int
) -> Float[Array, "groups group out"]:
  """Values ``scale * (q - zero)`` in float32."""
  zero = symmetric_zero(bits) if params.zero is None else params.zero[:, None]
  return params.scale.astype(jnp.float32)[:, None] * (codes.astype(jnp.int32) - zero).astype(jnp.float32)


def _group_error(w, params, bits, norm):
  err = dequantize_groups(quantize_groups(w, params, bits), params, bits) - w
  return jnp.sum(jnp.abs(err) ** norm, axis=1)


def find_params(w: Float[Array, "groups group out"], spec: QSpec, *, clip: ClipSearch | None = None) -> AffineParams:
  """Per-group scale and zero, optionally with the MSE clipping search.

  Args:
    w: (groups, group, out) float32 weights, grouped along the input axis.
    spec: the quantization spec (bits, symmetric, scale dtype).
    clip: if given, shrink each group's range over a grid and keep the best.

  Returns:
    `AffineParams` with (groups, out) fields.
  """
  lo, hi = jnp.min(w, axis=1), jnp.max(w, axis=1)
  params = params_from_range(lo, hi, spec)
  if clip is None:
    return params

  def body(i, best):
    best_err, best_params = best
    shrink = 1.0 - i.astype(jnp.float32) / clip.grid
    cand = params_from_range(lo * shrink, hi * shrink, spec)
    err = _group_error(w, cand, spec.bits, clip.norm)
    better = err < best_err
    pick = lambda new, old: None if new is None else jnp.where(better, new, old)
    return jnp.where(better, err, best_err), AffineParams(*map(pick, cand, best_params))

  init_err = _group_error(w, params, spec.bits, clip.norm)
  _, params = jax.lax.fori_loop(1, clip.num_candidates, body, (init_err, params))
  return params


def quantize(
  w: Float[Array, "in out"], spec: QSpec, *, clip: ClipSearch | None = None
) -> tuple[Integer[Array, "in out"], AffineParams]:
  """Round-to-nearest affine quantization of a ``[in, out]`` matrix, group-wise along ``in``.

  Args:
    w: (in, out) float; groups of `spec.group_size` run along ``in``.
    spec: bits, group size, symmetry and scale dtype.
    clip: optional MSE clipping search.

  Returns:
    codes: (in, out) uint8 in ``[0, 2**bits)``.
    params: `AffineParams` with (groups, out) scale and zero.

  Raises:
    ValueError: if the group size does not divide ``in`` or `w` is not 2-D.

  Examples:
    >>> import numpy as np
    >>> codes, params = quantize(np.linspace(-1, 1, 8, dtype=np.float32)[:, None],
    ...                          QSpec(bits=2, group_size=-1, scale_dtype=np.float32))
    >>> codes[:, 0].tolist(), params.scale.tolist()
    ([0, 1, 1, 2, 2, 3, 3, 3], [[0.6666666865348816]])
  """
  _check_groups("quantize", w, spec)
  grouped = group_view(jnp.asarray(w, jnp.float32), spec)
  params = find_params(grouped, spec, clip=clip)
  codes = quantize_groups(grouped, params, spec.bits)
  return ungroup(codes, w.shape[0]), params


def dequantize(codes: Integer[Array, "in out"], params: AffineParams, spec: QSpec) -> Float[Array, "in out"]:
  """Inverse of `quantize`: ``scale * (codes - zero)`` as float32, shape (in, out)."""
  grouped = group_view(codes, spec)
  return ungroup(dequantize_groups(grouped, params, spec.bits), codes.shape[0])
