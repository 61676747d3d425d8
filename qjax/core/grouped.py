"""Rows grouped by expert: the layout mixture-of-experts layers compute in and calibration reads statistics from.

Each token goes to k experts; the (token, expert) pairs are sorted by expert and each expert's rows padded to
whole tiles, so every tile belongs to one expert (`group_by_expert`). A grouped matmul then multiplies tile by
tile (`qjax.kernels.grouped_matmul`), and a statistic accumulates per expert tile by tile
(`qjax.calib.stats.update_states`), each from exactly the rows of its expert.
"""

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class GroupedRows(NamedTuple):
  """Rows sorted by expert, each expert's padded to whole tiles (padding rows are zero and belong to no token).

  Attributes:
    x: (tiles * tile, d) the rows.
    tile_expert: (tiles,) int32, the expert of each tile (tiles past the last group: any expert, all padding).
    padded_sizes: (experts,) int32, rows per expert including its padding (multiples of the tile).
    group_sizes: (experts,) int32, rows per expert that are (token, expert) pairs: the tokens each expert sees.
    routed: (experts,) int32, tokens the router sent to each expert (equal to `group_sizes` unless every token
      is sent to every expert for calibration).
  """

  x: Array
  tile_expert: Array
  padded_sizes: Array
  group_sizes: Array
  routed: Array

  @property
  def tile(self) -> int:
    return self.x.shape[0] // self.tile_expert.shape[0]

  def tiles(self) -> Array:
    """(tiles, tile, d)."""
    return self.x.reshape(self.tile_expert.shape[0], self.tile, self.x.shape[-1])

  def replace_x(self, x: Array) -> "GroupedRows":
    return self._replace(x=x)


def tile_rows(pairs: int, num_experts: int) -> int:
  """Rows per tile for `pairs` (token, expert) pairs: a power of two near a quarter of an expert's mean share, in
  [8, 256], so the padding (under one tile per expert) stays a fraction of the work."""
  target = max(pairs // (4 * num_experts), 1)
  return int(min(256, max(8, 1 << (target.bit_length() - 1))))


def group_by_expert(
  x: Float[Array, "n d"], experts: Int[Array, "n k"], num_experts: int, routed: Int[Array, " e"] | None = None
) -> tuple[GroupedRows, Int[Array, "n k"]]:
  """The rows each expert computes, and where each (token, slot) pair's row is.

  Args:
    x: the tokens.
    experts: the experts each token goes to (k distinct per token).
    num_experts: E.
    routed: the router's counts per expert, when `experts` is not the router's choice (every token to every
      expert); default: counted from `experts`.

  Returns:
    (`GroupedRows`, the row of each pair (n, k)).
  """
  n, k = experts.shape
  pairs = n * k
  tile = tile_rows(pairs, num_experts)
  num_tiles = -(-pairs // tile) + min(num_experts, pairs)  # each non-empty group adds at most one partial tile
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  padded = (sizes + tile - 1) // tile * tile
  starts, padded_starts = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
  sorted_experts = flat[order]
  rank = jnp.arange(pairs) - starts[sorted_experts]
  row_of_pair = jnp.zeros((pairs,), jnp.int32).at[order].set((padded_starts[sorted_experts] + rank).astype(jnp.int32))
  rows = jnp.zeros((num_tiles * tile, x.shape[-1]), x.dtype).at[row_of_pair].set(jnp.repeat(x, k, axis=0))
  ends = jnp.cumsum(padded)
  tile_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(num_tiles) * tile, side="right"), num_experts - 1)
  grouped = GroupedRows(rows, tile_expert.astype(jnp.int32), padded, sizes, sizes if routed is None else routed)
  return grouped, row_of_pair.reshape(n, k)
