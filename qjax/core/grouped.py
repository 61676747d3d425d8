"""Rows grouped by expert: the layout mixture-of-experts layers compute in and calibration reads statistics from.

Each token goes to k experts; the (token, expert) pairs are sorted by expert and each expert's rows padded to
whole tiles, so every tile belongs to one expert (`group_by_expert`). A grouped matmul then multiplies tile by
tile (`qjax.kernels.grouped_matmul`), and a statistic accumulates per expert tile by tile
(`qjax.calib.stats.update_states`), each from exactly the rows of its expert; each expert's Gram matrix (its
Hessian) is `grouped_gram`.

Grouped products have two methods: ``"tiles"``, a loop over tiles, each one expert's dense matmul, what CPUs run
well (XLA's CPU ragged dot computes every group densely: E times the work); and ``"ragged"``,
`jax.lax.ragged_dot_general`, what accelerators implement as grouped kernels (megablox's gmm and its transposed
form on TPU). `default_method` picks by platform.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_HIGHEST = jax.lax.Precision.HIGHEST


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

  def used_tiles(self) -> Array:
    """() int32: how many tiles hold some expert's rows (the rest, at the end, are padding alone)."""
    return jnp.sum(self.padded_sizes) // self.tile

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
  # Gathered, not scattered: one pass writes the rows (a scatter first zeroes them, then writes a repeated copy).
  pair_of_row = jnp.full((num_tiles * tile,), pairs, jnp.int32).at[row_of_pair].set(jnp.arange(pairs, dtype=jnp.int32))
  token_of_row = jnp.minimum(pair_of_row // k, n - 1)
  rows = jnp.where((pair_of_row < pairs)[:, None], x[token_of_row], jnp.zeros((), x.dtype))
  ends = jnp.cumsum(padded)
  tile_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(num_tiles) * tile, side="right"), num_experts - 1)
  grouped = GroupedRows(rows, tile_expert.astype(jnp.int32), padded, sizes, sizes if routed is None else routed)
  return grouped, row_of_pair.reshape(n, k)


def scan_tiles(step: Callable[[Any, Array, Array], tuple[Any, Any]], carry: Any, rows: GroupedRows) -> tuple[Any, Any]:
  """`jax.lax.scan` of ``step(carry, tile (tile, d), expert) -> (carry, y)`` over the tiles, skipping the trailing
  tiles of padding alone (carry unchanged, y zeros).

  The grid of tiles is sized for the worst case (every expert's last tile partial); how many are used is known only
  at run time. Skipping the rest took the grouped Gram of `scripts/bench_forward.py --moe` from about 200 to 155 ms
  (a tenth of its tiles are trailing padding; scanning them had cost more than their share). A scan with a `cond`,
  not a while loop of that many steps, so reverse-mode differentiation still works (learned clipping trains
  through it).
  """
  used = rows.used_tiles()

  def skip(carry, t, e):
    y = jax.eval_shape(step, carry, t, e)[1]
    return carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), y)

  def one(carry, args):
    i, t, e = args
    return jax.lax.cond(i < used, step, skip, carry, t, e)

  return jax.lax.scan(one, carry, (jnp.arange(rows.tile_expert.shape[0]), rows.tiles(), rows.tile_expert))


def default_method() -> str:
  """How grouped products run here: ``"tiles"`` on CPU, ``"ragged"`` on accelerators."""
  return "tiles" if jax.default_backend() == "cpu" else "ragged"


def grouped_gram(rows: GroupedRows, acc: Float[Array, "e d d"] | None = None, *, method: str | None = None
                 ) -> Float[Array, "e d d"]:  # fmt: skip
  """``acc_e + X_eᵀ X_e`` for every expert's rows, float32 at full precision (padding rows add nothing).

  Args:
    rows: the grouped rows (d wide) of E experts.
    acc: (E, d, d) float32 Gram matrices the products are added to (default zeros); tile by tile it is updated
      in place, so a caller that donates it holds one (E, d, d) buffer, not three.
    method: ``"tiles"`` (a scan over tiles, each added into its expert's slot in place) or ``"ragged"``
      (`jax.lax.ragged_dot_general` with the rows as the ragged contracting dimension); default by platform.
  """
  x = rows.x.astype(jnp.float32)
  if acc is None:
    acc = jnp.zeros((rows.padded_sizes.shape[0], x.shape[-1], x.shape[-1]), jnp.float32)
  if (method or default_method()) == "ragged":
    dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [0]), ([], [])), lhs_ragged_dimensions=[1], rhs_group_dimensions=[]
    )
    sizes = rows.padded_sizes.at[-1].add(x.shape[0] - jnp.sum(rows.padded_sizes))  # trailing tiles: padding
    return acc + jax.lax.ragged_dot_general(x.T, x, sizes, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)

  def tile(acc, t, e):
    return acc.at[e].add(jnp.dot(t.T, t, precision=_HIGHEST)), None

  return scan_tiles(tile, acc, rows.replace_x(x))[0]
