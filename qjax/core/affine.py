"""The affine grid (scale and zero point) of GPTQ and AWQ checkpoints, with an optional MSE clipping search.

The grid follows GPTQ's quantizer, which GPTQ/AWQ checkpoints and their loaders assume:
with ``maxq = 2**bits - 1`` a group's codes are ``q = clip(round(w / s) + z, 0, maxq)``
and its values ``s * (q - z)``.

* Asymmetric: the range ``[min(w, 0), max(w, 0)]`` is split in ``maxq`` steps,
  ``s = (hi - lo) / maxq`` and ``z = round(-lo / s)``.
* Symmetric: ``z = 2**(bits-1)`` is fixed and ``s = 2 * max|w| / maxq``.
  (GPTQ's reference uses ``s = max(w) / maxq`` for a group without negative values,
  which then clips that group to half its range; qjax keeps the grid symmetric.)

Rounding is round-half-to-even, as `torch.round`. Scales are rounded to the grid's
`scale_dtype` before the codes are computed, so ``s * (q - z)`` is exactly what an
exporter stores.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer

from qjax.core.grid import GroupParams


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


def max_code(bits: int) -> int:
  return (1 << bits) - 1


def symmetric_zero(bits: int) -> int:
  return 1 << (bits - 1)


def params_from_range(
  lo: Float[Array, "*g"], hi: Float[Array, "*g"], *, bits: int, symmetric: bool, scale_dtype: np.dtype
) -> GroupParams:
  """Scale and zero of the grid spanning ``[lo, hi]`` (GPTQ's `find_params`)."""
  maxq = max_code(bits)
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  if symmetric:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  dead = (lo == 0.0) & (hi == 0.0)
  lo = jnp.where(dead, -1.0, lo)
  hi = jnp.where(dead, 1.0, hi)
  scale = ((hi - lo) / maxq).astype(scale_dtype)
  if symmetric:
    return GroupParams(scale, None)
  zero = jnp.clip(jnp.round(-lo / scale.astype(jnp.float32)), 0, maxq).astype(jnp.int32)
  return GroupParams(scale, zero)


def quantize_groups(
  w: Float[Array, "groups rows out"], params: GroupParams, bits: int
) -> Integer[Array, "groups rows out"]:
  """Codes of grouped weights on a given grid (no range search)."""
  maxq = max_code(bits)
  scale = params.scale.astype(jnp.float32)[:, None]
  zero = symmetric_zero(bits) if params.zero is None else params.zero[:, None]
  return jnp.clip(jnp.round(w / scale) + zero, 0, maxq).astype(jnp.uint8)


def dequantize_groups(
  codes: Integer[Array, "groups rows out"], params: GroupParams, bits: int
) -> Float[Array, "groups rows out"]:
  """Values ``scale * (q - zero)`` in float32."""
  zero = symmetric_zero(bits) if params.zero is None else params.zero[:, None]
  return params.scale.astype(jnp.float32)[:, None] * (codes.astype(jnp.int32) - zero).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AffineGrid:
  """The affine grid: ``bits``-bit codes, a scale per group and, unless symmetric, an integer zero point.

  Implements `qjax.core.grid.Grid`: ``fit`` takes each group's range (GPTQ's ``find_params``), with `clip` the
  range shrink of least ``L_norm`` error; the importance of the inputs is not used.

  Attributes:
    bits: code width.
    symmetric: a fixed zero point ``2**(bits-1)`` and ``s = 2 max|w| / maxq``; else a zero point per group.
    scale_dtype: dtype the scales are stored (and rounded) in.
    clip: optional MSE clipping search.

  Examples:
    >>> import numpy as np
    >>> grid = AffineGrid(bits=2, symmetric=False, scale_dtype=np.dtype(np.float32))
    >>> w = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8, 1)
    >>> codes, values = grid.round(w, grid.fit(w), np.arange(8))
    >>> codes[0, :, 0].tolist()
    [0, 1, 1, 2, 2, 3, 3, 3]
  """

  bits: int
  symmetric: bool
  scale_dtype: np.dtype
  clip: ClipSearch | None = None

  def fit(self, w: Float[Array, "groups group out"], importance=None) -> GroupParams:
    """Per-group scale and zero of (groups, group, out) float32 weights: (groups, out) each."""
    del importance  # the affine grid's fit looks at the weights alone
    lo, hi = jnp.min(w, axis=1), jnp.max(w, axis=1)
    params = self._from_range(lo, hi)
    if self.clip is None:
      return params
    clip = self.clip

    def body(i, best):
      best_err, best_params = best
      shrink = 1.0 - i.astype(jnp.float32) / clip.grid
      cand = self._from_range(lo * shrink, hi * shrink)
      err = self._group_error(w, cand, clip.norm)
      better = err < best_err
      pick = lambda new, old: None if new is None else jnp.where(better, new, old)
      return jnp.where(better, err, best_err), GroupParams(*map(pick, cand, best_params))

    init_err = self._group_error(w, params, clip.norm)
    _, params = jax.lax.fori_loop(1, clip.num_candidates, body, (init_err, params))
    return params

  def round(self, w, params: GroupParams, positions: Int[Array, " rows"]):
    del positions  # one scale per group
    codes = quantize_groups(w, params, self.bits)
    return codes, dequantize_groups(codes, params, self.bits)

  def dequantize(self, codes, params: GroupParams, positions: Int[Array, " rows"]):
    del positions
    return dequantize_groups(codes, params, self.bits)

  def _from_range(self, lo, hi) -> GroupParams:
    return params_from_range(lo, hi, bits=self.bits, symmetric=self.symmetric, scale_dtype=self.scale_dtype)

  def _group_error(self, w, params, norm):
    err = dequantize_groups(quantize_groups(w, params, self.bits), params, self.bits) - w
    return jnp.sum(jnp.abs(err) ** norm, axis=1)
