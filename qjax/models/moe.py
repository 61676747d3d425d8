"""Mixture-of-experts layers (Mixtral, Qwen3-MoE): top-k routing, tokens grouped by expert, grouped matmuls.

A sparse layer's MLP is a router (``mlp/gate``, a float Linear to ``num_experts`` logits) and a stack of SwiGLU
experts whose kernels hold every expert at once: ``mlp/experts/{gate,up,down}_proj/kernel`` of shape
``(experts, in, out)`` (dense, or a `QArray` whose leaves carry the expert axis in front, as `jax.vmap` stacks
them). Checkpoints store one tensor per expert; the readers stack them and the writers split them.

Each token goes to its top-k experts. The (token, expert) pairs are sorted by expert into `GroupedRows`: every
expert's rows padded to whole tiles of ``tile`` rows, so each tile belongs to one expert. The expert linears then
multiply tile by tile (`grouped_matmul`: a `jax.lax.scan` over tiles on CPU, where XLA's ragged dot computes
every group densely; `jax.lax.ragged_dot` on accelerators), costing about the active parameters' FLOPs rather
than every expert's. The calibration runner sees the same `GroupedRows` as the experts' input and accumulates
each expert's statistics from exactly its rows (`qjax.calib.stats.update_grouped`).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from qjax.core import QArray, dequantize, is_qarray
from qjax.kernels import qmatmul
from qjax.models.config import LlamaConfig
from qjax.models.linear import Linear, stored_param


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


def route(logits: Float[Array, "n e"], k: int, *, normalize: bool) -> tuple[Float[Array, "n k"], Int[Array, "n k"]]:
  """The top-k experts of each token and their weights: softmax in float32, the k largest, renormalised to sum to
  one when `normalize` (transformers' Mixtral always, Qwen3-MoE with ``norm_topk_prob``)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


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


def expert(w: Array | QArray, e: Array) -> Array | QArray:
  """Expert `e`'s (in, out) kernel of a stack (dense (E, in, out), or a QArray with the expert axis in front)."""
  return jax.tree.map(lambda leaf: leaf[e], w) if is_qarray(w) else w[e]


def grouped_matmul(rows: GroupedRows, w: Array | QArray, *, method: str | None = None) -> Float[Array, "r out"]:
  """``y_r = x_r @ w[expert(r)]`` for every row; padding rows give zeros.

  Args:
    rows: the grouped rows.
    w: (E, in, out) kernels, dense or a stacked `QArray`.
    method: ``"tiles"`` (a scan over tiles, each one expert's matmul: what CPUs run well) or ``"ragged"``
      (`jax.lax.ragged_dot` on the padded groups: what accelerators implement); default by platform.
  """
  method = method or ("tiles" if jax.default_backend() == "cpu" else "ragged")
  if method == "ragged":
    dense = jax.vmap(dequantize)(w) if is_qarray(w) else w
    out = jax.lax.ragged_dot(rows.x, dense.astype(rows.x.dtype), rows.padded_sizes, preferred_element_type=jnp.float32)
    return out.astype(rows.x.dtype)

  def one_tile(args):
    x, e = args
    we = expert(w, e)
    if is_qarray(we):
      return qmatmul(x, we)
    return jnp.dot(x, we.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)

  out = jax.lax.map(one_tile, (rows.tiles(), rows.tile_expert))
  return out.reshape(rows.x.shape[0], -1)


class ExpertLinear(nn.Module):
  """Every expert's linear at once: ``kernel`` (E, in, out), applied to `GroupedRows` (`grouped_matmul`)."""

  features: int
  num_experts: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, rows: GroupedRows) -> Array:
    shape = (self.num_experts, rows.x.shape[-1], self.features)
    kernel = stored_param(self, "kernel", shape, nn.initializers.normal(0.02), self.dtype)
    return grouped_matmul(rows, kernel)


class Experts(nn.Module):
  """SwiGLU experts ``down(silu(gate(x)) * up(x))``, each on its own rows."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, rows: GroupedRows) -> Array:
    cfg = self.config
    linear = lambda features, name: ExpertLinear(features, cfg.num_experts, self.dtype, name=name)
    gate = linear(cfg.expert_size, "gate_proj")(rows)
    up = linear(cfg.expert_size, "up_proj")(rows)
    return linear(cfg.hidden_size, "down_proj")(rows.replace_x(nn.silu(gate) * up))


class SparseMoeBlock(nn.Module):
  """A router and its experts in place of the MLP; each token's output is its experts' outputs, weighted.

  Attributes:
    all_experts: compute every expert on every token (the output still weighs only the routed ones): calibration
      that gives each expert statistics from all tokens (llm-compressor's ``moe_calibrate_all_experts``).
  """

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  all_experts: bool = False

  @nn.compact
  def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
    cfg = self.config
    b, t, d = x.shape
    tokens = x.reshape(b * t, d)
    logits = Linear(cfg.num_experts, False, self.dtype, name="gate")(tokens)
    weights, experts = route(logits, cfg.num_experts_per_tok, normalize=cfg.norm_topk_prob)
    if self.all_experts:
      routed = jnp.bincount(experts.reshape(-1), length=cfg.num_experts).astype(jnp.int32)
      weights = jnp.zeros((b * t, cfg.num_experts), weights.dtype).at[jnp.arange(b * t)[:, None], experts].set(weights)
      experts = jnp.broadcast_to(jnp.arange(cfg.num_experts, dtype=jnp.int32), weights.shape)
      rows, row_of_pair = group_by_expert(tokens, experts, cfg.num_experts, routed)
    else:
      rows, row_of_pair = group_by_expert(tokens, experts, cfg.num_experts)
    out = Experts(cfg, self.dtype, name="experts")(rows)
    # Weighted in the hidden dtype, summed over the k slots in float32 (transformers adds each expert's share).
    pair_out = out[row_of_pair] * weights[..., None].astype(out.dtype)
    return jnp.sum(pair_out.astype(jnp.float32), axis=1).astype(x.dtype).reshape(b, t, d)
