"""A new scheme in one file: SmoothQuant-style smoothing, then the export's rounding, on qjax's public API.

  qjax quantize --recipe=experiments/new_scheme.py:recipe --group_size=64 --nosym --out=runs/smooth

Each input channel ``j`` of the linears reading one input is scaled by ``s_j = max|x_j|^α / max|w_j|^(1-α)`` and
the operation producing the input divided by it (the float model is unchanged); then the weights are rounded.
"""

import functools

import jax.numpy as jnp

import qjax

ALPHA = 0.5  # how much of the activations' range migrates into the weights


def smooth(alpha: float = ALPHA) -> qjax.Transform:
  """SmoothQuant's per-channel smoothing of every scale group of a block, from the inputs' absolute maxima."""

  def smooth_block(block, *, stats, block_model, **_):
    for group in block_model.scale_groups(block):
      kernels = [functools.reduce(dict.get, m.split("/"), block)["kernel"] for m in group.linears]
      w_max = jnp.max(jnp.stack([jnp.abs(w).max(axis=1) for w in kernels]), axis=0)
      x_max = stats[f"{group.linears[0]}/kernel"]["abs_max"]
      s = jnp.clip(x_max**alpha / jnp.maximum(w_max, 1e-5) ** (1 - alpha), 1e-5, 1e5)
      block = qjax.fold_scales(block, group, s)
    return block

  return qjax.per_block(smooth_block, stats=frozenset({"abs_max"}), name="`smooth`")


def recipe(rounding: qjax.Recipe) -> qjax.Recipe:
  """Smoothing, then whatever the export rounds with (RTN on --bits/--group_size, or a GGUF recipe)."""
  return qjax.Recipe((smooth(),), "smoothquant") + rounding
