"""The rounding-grid protocol: how a group of weights becomes integer codes, and codes become values again.

A grid is the seam where a number format plugs into every method. RTN, GPTQ's column sweep (its grid refresh at
group boundaries included) and AWQ's scale search call these three functions and nothing else, so a new format
(a non-uniform codebook, a floating-point grid, a llama.cpp block type) is one class in one file and every method
rounds into it.

Arrays are grouped along the contraction axis: ``w[g, r, o]`` is row ``r`` of group ``g`` (input channel
``g * group + r``) and output channel ``o``. A grid's parameters carry a leading groups axis and a trailing output
axis, so ``params[g]`` are one group's and the output channels can be split over devices.
"""

from typing import NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Integer


class GroupParams(NamedTuple):
  """What a grid fitted to each group: a scale and an optional zero point (or whatever the grid stores there).

  Attributes:
    scale: (groups, ..., out), e.g. the affine grid's (groups, out) scales or a llama.cpp block's scale bytes.
    zero: (groups, ..., out) or None, e.g. the affine grid's integer zero points.
  """

  scale: Array
  zero: Array | None = None


@runtime_checkable
class Grid(Protocol):
  """How one group of weights becomes codes of `bits` bits.

  Attributes:
    bits: width of one code; codes lie in ``[0, 2**bits)``.
  """

  bits: int

  def fit(
    self, w: Float[Array, "groups group out"], importance: Float[Array, "groups group"] | None = None
  ) -> GroupParams:
    """Parameters of each group of `w` (e.g. scale and zero from its range), optionally weighted by the
    importance of each input channel (e.g. llama.cpp's importance matrix or GPTQ's Hessian diagonal)."""
    ...

  def round(
    self, w: Float[Array, "groups rows out"], params: GroupParams, positions: Int[Array, " rows"]
  ) -> tuple[Integer[Array, "groups rows out"], Float[Array, "groups rows out"]]:
    """Codes of `w` on fitted parameters, and the float32 values they stand for; `positions` are the rows'
    places inside their group (a block grid keeps one scale per sub-block)."""
    ...

  def dequantize(
    self, codes: Integer[Array, "groups rows out"], params: GroupParams, positions: Int[Array, " rows"]
  ) -> Float[Array, "groups rows out"]:
    """The float32 values of codes (the inverse of `round` on the grid's points)."""
    ...


def group_params(params: GroupParams, g: Int[Array, ""]) -> GroupParams:
  """Group `g`'s parameters, keeping a groups axis of length one."""
  take = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, g, 1, axis=0)
  return GroupParams(*map(take, params))


def set_group_params(params: GroupParams, g: Int[Array, ""], new: GroupParams) -> GroupParams:
  """`params` with group `g` replaced by `new` (a groups axis of length one)."""
  put = lambda a, b: None if a is None else jax.lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), g, axis=0)
  return GroupParams(*map(put, params, new))


def empty_params(grid: Grid, like: Float[Array, "k out"], groups: int, group: int) -> GroupParams:
  """Zero parameters of the shapes and dtypes `grid.fit` returns for `groups` groups of `like`'s columns.

  Built with ``zeros_like`` from `like`, so under ``shard_map`` they vary over devices as `like` does.
  """
  shapes = jax.eval_shape(grid.fit, jax.ShapeDtypeStruct((groups, group, like.shape[1]), jnp.float32))
  return jax.tree.map(lambda s: jnp.zeros_like(like, s.dtype, shape=s.shape), shapes)


@runtime_checkable
class TensorGrid(Grid, Protocol):
  """A grid with one parameter per tensor besides its group parameters (NVFP4's global scale).

  `fit` needs that parameter fixed first: a quantizer fixes it once per matrix, before its jitted work, with
  ``for_tensor(max|w|)`` (through `qjax.core.QSpec.for_tensor`). GPTQ fits a group at a time and cannot see the
  whole tensor then, so the grid cannot find the parameter inside `fit`.

  Attributes:
    fixed: whether the per-tensor parameter is set.
  """

  @property
  def fixed(self) -> bool: ...

  def for_tensor(self, amax: Float[Array, ""]) -> "TensorGrid":
    """This grid with its per-tensor parameter set from the tensor's largest magnitude `amax` (a static Python
    value when `amax` is concrete, a traced one inside a transformation)."""
    ...
