"""Learnable weight clipping (OmniQuant's LWC): per-group clipping ranges trained by gradient descent.

Each group's range is ``[σ(β) min(w), σ(γ) max(w)]`` (``±σ(γ) max|w|`` for symmetric grids),
with ``γ, β`` learned on the block's output error through a straight-through rounding.
Initialised at ``σ(4) ≈ 0.98``: close to plain RTN.

This module holds the differentiable fake quantization of one matrix; the training loop is
`qjax.calib.lwc`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core import QSpec
from qjax.core.qarray import group_view, ungroup

INIT_LOGIT = 4.0


def round_ste(x: Array) -> Array:
  """Rounds in the forward pass, identity in the backward pass."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def init_logits(w: Float[Array, "in out"], spec: QSpec) -> dict[str, Array]:
  """``{"gamma", "beta"}`` logits, (groups, out) each, at `INIT_LOGIT`."""
  shape = (spec.num_groups(w.shape[0]), w.shape[1])
  logits = {"gamma": jnp.full(shape, INIT_LOGIT, jnp.float32)}
  if not spec.symmetric:
    logits["beta"] = jnp.full(shape, INIT_LOGIT, jnp.float32)
  return logits


def clip_range(w: Float[Array, "in out"], logits: dict[str, Array], spec: QSpec) -> tuple[Array, Array]:
  """The learned (lo, hi) of every (group, output channel)."""
  g = group_view(jnp.asarray(w, jnp.float32), spec)
  if spec.symmetric:
    hi = jax.nn.sigmoid(logits["gamma"]) * jnp.abs(g).max(axis=1)
    return -hi, hi
  return jax.nn.sigmoid(logits["beta"]) * g.min(axis=1), jax.nn.sigmoid(logits["gamma"]) * g.max(axis=1)


def fake_quantize(w: Float[Array, "in out"], logits: dict[str, Array], spec: QSpec) -> Float[Array, "in out"]:
  """Differentiable ``dequant(quant(w))`` on the learned ranges (straight-through rounding)."""
  lo, hi = clip_range(w, logits, spec)
  maxq = 2**spec.bits - 1
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  scale = jnp.maximum(hi - lo, 1e-8) / maxq
  zero = 2 ** (spec.bits - 1) if spec.symmetric else round_ste(-lo / scale)
  g = group_view(jnp.asarray(w, jnp.float32), spec)
  q = jnp.clip(round_ste(g / scale[:, None]) + (zero if spec.symmetric else zero[:, None]), 0, maxq)
  deq = (q - (zero if spec.symmetric else zero[:, None])) * scale[:, None]
  return ungroup(deq, w.shape[0])


def apply_clip(w: Float[Array, "in out"], logits: dict[str, Array], spec: QSpec) -> Float[Array, "in out"]:
  """`w` clamped to its learned ranges, for a rounding transform that follows."""
  lo, hi = clip_range(w, logits, spec)
  g = group_view(jnp.asarray(w, jnp.float32), spec)
  return ungroup(jnp.clip(g, lo[:, None], hi[:, None]), w.shape[0]).astype(w.dtype)
