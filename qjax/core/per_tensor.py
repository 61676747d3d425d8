"""`PerTensorGrid`: one scale for a whole weight matrix (compressed-tensors' ``tensor`` strategy, the classic FP8
checkpoint's ``weight_scale``), on a symmetric grid that otherwise fits a scale per group."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from qjax.core.affine import AffineGrid
from qjax.core.fp_grid import Fp8Grid
from qjax.core.grid import Grid, GroupParams

UNFIXED_MSG = (
  "PerTensorGrid has no scale yet; fix it per matrix with spec.for_tensor(max|w|) (rtn_quantize and gptq_quantize "
  "do) or give PerTensorGrid(grid, scale=...)."
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PerTensorGrid:
  """`grid`'s codes with one scale for the whole tensor: the scale `grid` fits to a group whose largest magnitude is
  the tensor's, stored for every group (a `qjax.core.grid.TensorGrid`, fixed once per matrix).

  Attributes:
    grid: a symmetric grid with a scale per group: `AffineGrid` (``symmetric=True``) or `Fp8Grid`.
    scale: the tensor's scale, in `grid`'s scale dtype; None until a quantizer fixes it.

  Examples:
    >>> import numpy as np
    >>> grid = PerTensorGrid(grid=Fp8Grid()).for_tensor(2.0)
    >>> w = np.array([[[1.0], [0.5]], [[0.01], [-2.0]]], np.float32)  # two groups of two
    >>> grid.scale == float(np.float32(2.0 / 448)), grid.fit(w).scale.ravel().tolist() == [grid.scale] * 2
    (True, True)
  """

  grid: Grid
  scale: float | None = None
  scale_bits: ClassVar[int] = 0  # one scale per matrix: nothing per weight

  def __post_init__(self):
    symmetric_affine = isinstance(self.grid, AffineGrid) and self.grid.symmetric and self.grid.clip is None
    if not (symmetric_affine or isinstance(self.grid, Fp8Grid)):
      raise ValueError(f"`PerTensorGrid` expected a symmetric AffineGrid or an Fp8Grid, got {self.grid}.")

  @property
  def bits(self) -> int:
    return self.grid.bits

  @property
  def fixed(self) -> bool:
    return self.scale is not None

  def for_tensor(self, amax: Float[Array, ""]) -> "PerTensorGrid":
    scale = self.grid.fit(jnp.full((1, 1, 1), amax, jnp.float32)).scale[0, 0]
    return PerTensorGrid(grid=self.grid, scale=scale if isinstance(scale, jax.core.Tracer) else float(scale))

  def fit(self, w: Float[Array, "groups group out"], importance=None) -> GroupParams:
    del importance
    if self.scale is None:
      raise ValueError(UNFIXED_MSG)
    dtype = self.grid.scale_dtype
    return GroupParams(jnp.full((w.shape[0], w.shape[2]), self.scale, dtype), None)

  def round(self, w, params: GroupParams, positions: Int[Array, " rows"]):
    return self.grid.round(w, params, positions)

  def dequantize(self, codes, params: GroupParams, positions: Int[Array, " rows"]):
    return self.grid.dequantize(codes, params, positions)
