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
each expert's statistics from exactly its rows (`qjax.calib.stats.update_states`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from qjax.core.grouped import GroupedRows, group_by_expert
from qjax.kernels.grouped import grouped_matmul
from qjax.models.config import LlamaConfig
from qjax.models.linear import Linear, stored_param


def route(logits: Float[Array, "n e"], k: int, *, normalize: bool) -> tuple[Float[Array, "n k"], Int[Array, "n k"]]:
  """The top-k experts of each token and their weights: softmax in float32, the k largest, renormalised to sum to
  one when `normalize` (transformers' Mixtral always, Qwen3-MoE with ``norm_topk_prob``)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


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
