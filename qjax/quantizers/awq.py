"""AWQ: activation-aware scaling of input channels before rounding, and a clipping search.

A few input channels carry large activations; their weights matter most. AWQ scales input
channel ``j`` of the linears that read one input by ``s_j`` (and divides the input by it,
folding ``1/s`` into the operation that produces it), so the function is unchanged but
rounding hurts the salient channels less. With ``x̄`` the mean ``|x|`` of each input channel
and ``w̄`` the mean group-normalised ``|w|``,

``s(α) = x̄^α / (w̄^(1-α) + 1e-4)``, normalised by ``sqrt(max(s) min(s))``,

and ``α`` is chosen on a grid of `n_grid` points in ``[0, 1)`` to minimise the error of the
block part the linears feed, ``‖f(W) - f(Q(W diag s) diag(1/s))‖²``. Then, for each group
of input channels, the weights are clipped to ``±p max|w|`` with ``p`` on a grid down to
``1 - max_shrink``, minimising the error of the group's partial dot products on sample inputs.

This module holds the math on arrays; `qjax.transforms.awq` applies it to a block's params.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core import QSpec
from qjax.core.qarray import grid_values, group_view, round_to_grid, ungroup


def fake_quantize(w: Float[Array, "in out"], spec: QSpec) -> Float[Array, "in out"]:
  """``dequantize(quantize(w))`` on `spec`'s grid, float32 (a per-tensor parameter not yet set is fixed from `w`,
  traced: each scaled candidate gets its own, as it would when quantized)."""
  spec = spec.for_tensor(jnp.max(jnp.abs(w))) if spec.needs_tensor_fit else spec
  codes, params = round_to_grid(w, spec)
  return grid_values(codes, params, spec)


def weight_salience(ws: list[Float[Array, "*experts in out"]], group: int) -> Float[Array, " in"]:
  """``w̄``: per input channel, the mean over output channels of ``|w| / max|w|`` within its group.

  Args:
    ws: the (in, out) kernels reading one input; a stack of experts' kernels (E, in, out) counts as E kernels.
    group: group size along ``in`` (-1: all of ``in``); a shorter last group is allowed.

  Returns:
    (in,) float32.
  """
  as_rows = lambda x: jnp.moveaxis(jnp.abs(jnp.asarray(x, jnp.float32)), -2, 0).reshape(x.shape[-2], -1)
  w = jnp.concatenate([as_rows(x) for x in ws], axis=1)
  k = w.shape[0]
  g = k if group == -1 else group
  pad = -k % g
  grouped = jnp.pad(w, ((0, pad), (0, 0))).reshape(-1, g, w.shape[1])
  normed = grouped / (grouped.max(axis=1, keepdims=True) + 1e-6)
  return normed.reshape(-1, w.shape[1])[:k].mean(axis=1)


def candidate_scales(
  x_mean: Float[Array, "*experts in"], w_mean: Float[Array, "*experts in"] | None, alpha: Float[Array, "*experts 1"]
) -> Float[Array, "*experts in"]:
  """``s(α)`` (with ``w̄`` when given, AutoAWQ's duo scaling), normalised to a geometric mean range of 1 (each
  row of a stack of experts' on its own, with its own α)."""
  s = x_mean**alpha
  if w_mean is not None:
    s = s / (w_mean ** (1.0 - alpha) + 1e-4)
  s = jnp.maximum(s, 1e-4)
  return s / jnp.sqrt(s.max(axis=-1, keepdims=True) * s.min(axis=-1, keepdims=True))


def search_scale(
  x_mean: Float[Array, "*experts in"],
  w_mean: Float[Array, "*experts in"] | None,
  loss: Callable[[Float[Array, "*experts in"]], Float[Array, "*experts"]],
  *,
  n_grid: int = 20,
) -> tuple[Float[Array, "*experts in"], Array]:
  """The ``s(α)`` minimising `loss` over ``α = i / n_grid``, ``i < n_grid``.

  A stack of independent searches (each expert of a mixture its own scales) runs at once: `x_mean` and `w_mean`
  carry the stack's leading axes, `loss` returns one error per member, and each member gets its own best α.

  Args:
    x_mean: (in,) mean |activation| per input channel.
    w_mean: (in,) weight salience (`weight_salience`), or None for ``s = x̄^α``.
    loss: ``s -> error`` of the block part when its linears use ``Q(W diag s) diag(1/s)``.
    n_grid: grid points.

  Returns:
    The best (in,) scales and the (n_grid,) losses (each with the stack's leading axes).
  """
  alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
  losses = jax.lax.map(lambda a: loss(candidate_scales(x_mean, w_mean, a)), alphas)
  best = jnp.argmin(losses, axis=0)  # first minimum, as the reference's strict `<`
  return candidate_scales(x_mean, w_mean, alphas[best][..., None]), losses


def search_clip(
  w: Float[Array, "in out"],
  x: Float[Array, "tokens in"],
  spec: QSpec,
  *,
  n_grid: int = 20,
  max_shrink: float = 0.5,
) -> Float[Array, "groups out"]:
  """Per (group, output channel) clipping bound ``p · max|w|`` minimising the partial-product error.

  For each group ``g`` of input channels and output channel ``o``, the error of
  ``Σ_{j∈g} x_j w_jo`` over the sample tokens, with ``w`` clipped to ``±p max|w|`` and
  fake-quantized, is minimised over ``p = 1 - i / n_grid``, ``i < max_shrink · n_grid``.

  Args:
    w: (in, out) float kernel (already scaled).
    x: (tokens, in) sample inputs of the kernel (already divided by the scales).
    spec: the grid the weights will be rounded to.
    n_grid: grid points of the shrink factor.
    max_shrink: the largest relative shrink tried.

  Returns:
    (groups, out) float32 clipping bounds.
  """
  w = jnp.asarray(w, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  wg = group_view(w, spec)  # (groups, group, out)
  k, g = w.shape[0], wg.shape[1]
  xg = jnp.pad(x, ((0, 0), (0, wg.shape[0] * g - k))).reshape(x.shape[0], -1, g)  # (tokens, groups, group)
  reference = jnp.einsum("tgj,gjo->tgo", xg, wg)
  max_abs = jnp.abs(wg).max(axis=1)  # (groups, out)

  def error(i):
    bound = max_abs * (1.0 - i.astype(jnp.float32) / n_grid)
    clipped = jnp.clip(wg, -bound[:, None], bound[:, None])
    q = group_view(fake_quantize(ungroup(clipped, k), spec), spec)
    return jnp.mean((jnp.einsum("tgj,gjo->tgo", xg, q) - reference) ** 2, axis=0), bound

  errors, bounds = jax.lax.map(error, jnp.arange(max(1, int(max_shrink * n_grid))))
  best = jnp.argmin(errors, axis=0)  # (groups, out)
  return jnp.take_along_axis(bounds, best[None], axis=0)[0]


def apply_clip(w: Float[Array, "in out"], bounds: Float[Array, "groups out"], spec: QSpec) -> Float[Array, "in out"]:
  """Clamps each (group, output channel) of `w` to ``±bound``."""
  wg = group_view(jnp.asarray(w, jnp.float32), spec)
  return ungroup(jnp.clip(wg, -bounds[:, None], bounds[:, None]), w.shape[0]).astype(w.dtype)
