"""Statistics of the inputs of a block's linear layers, as a registry of accumulators run in jitted code.

A transform names the statistics it reads (``Transform.stats``); the runner looks them up here, accumulates each
over the calibration batches (``update`` on each batch of inputs, inside the same jitted step that runs the
block) and hands the transform ``finalize``'s result, keyed by kernel path, plus the token count as ``"tokens"``.
Linears that read the same input (q/k/v, gate/up) share one accumulator. A new statistic is one `Statistic`
value: add it to `STATISTICS` (`register`), and any transform can name it.

A mixture of experts' linears read `GroupedRows`: every statistic is then kept per expert (a leading expert axis),
each expert's accumulated from exactly its rows, with its own token count (``"tokens"``, (E,)) and the router's
(``"routed"``); `qjax.calib.experts` decides what experts that saw few tokens get.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core.grouped import GroupedRows, grouped_gram, scan_tiles

_HIGHEST = jax.lax.Precision.HIGHEST


def _weighted_mean(values: Array, n: Array) -> Array:
  weights = n / jnp.maximum(jnp.sum(n), 1.0)
  return jnp.tensordot(weights, values, axes=1)


class Statistic(NamedTuple):
  """An accumulator over the inputs ``x`` (tokens, d) of a linear.

  Attributes:
    init: ``d -> state``, the empty accumulator (float32 arrays).
    update: ``(state, x) -> state`` for one batch of inputs, x float32 (tokens, d).
    finalize: ``(state, tokens) -> value``, tokens the float32 count of all inputs seen.
    pool: ``(values (E, ...), tokens (E,)) -> value``: a layer's value from its experts' (their token-weighted
      mean by default).
    neutral: ``d -> value`` that weighs nothing (an identity Hessian, unit importances): what an expert with too
      few tokens to measure gets when its statistics are not pooled (`qjax.calib.experts`).
    grouped_update: ``(state (E, ...), rows) -> state``, every expert's accumulator updated from `GroupedRows`,
      when a grouped kernel does it better than `update` tile by tile (the Hessian's:
      `qjax.core.grouped.grouped_gram`, which adds each tile's (d, d) product into its expert's slot in place
      rather than copying the slot out and back).

  Rows of zeros must leave the state unchanged (grouped rows are padded with them).
  """

  init: Callable[[int], Any]
  update: Callable[[Any, Float[Array, "tokens d"]], Any]
  finalize: Callable[[Any, Float[Array, ""]], Any]
  pool: Callable[[Any, Array], Any] = _weighted_mean
  neutral: Callable[[int], Any] = lambda d: jnp.ones((d,), jnp.float32)
  grouped_update: Callable[[Any, GroupedRows], Any] | None = None


def _mean(term: Callable[[Array], Array], shape: Callable[[int], tuple[int, ...]], **kw) -> Statistic:
  return Statistic(
    init=lambda d: jnp.zeros(shape(d), jnp.float32),
    update=lambda s, x: s + term(x),
    finalize=lambda s, n: s / n,
    **kw,
  )


STATISTICS: dict[str, Statistic] = {
  # XᵀX / n, (d, d): GPTQ's Hessian up to a factor 2.
  "hessian": _mean(
    lambda x: jnp.dot(x.T, x, precision=_HIGHEST),
    lambda d: (d, d),
    neutral=lambda d: jnp.eye(d, dtype=jnp.float32),
    grouped_update=lambda s, rows: grouped_gram(rows, s),
  ),
  # mean x² per input channel, (d,): llama.cpp's importance matrix.
  "imatrix": _mean(lambda x: jnp.sum(x * x, axis=0), lambda d: (d,)),
  # mean |x| per input channel, (d,): AWQ's activation salience.
  "abs_mean": _mean(lambda x: jnp.sum(jnp.abs(x), axis=0), lambda d: (d,)),
  # max |x| per input channel, (d,): SmoothQuant's activation range.
  "abs_max": Statistic(
    init=lambda d: jnp.zeros((d,), jnp.float32),
    update=lambda s, x: jnp.maximum(s, jnp.max(jnp.abs(x), axis=0)),
    finalize=lambda s, n: s,
    pool=lambda values, n: jnp.max(values, axis=0),
  ),
}
COUNTS = ("tokens", "routed")  # the entries of a state that are counts, not statistics


def register(name: str, statistic: Statistic) -> None:
  """Adds a statistic transforms can name.

  Raises:
    ValueError: if `name` is taken.
  """
  if name in STATISTICS or name in COUNTS:
    raise ValueError(f"`register` expected a new statistic name, got {name!r}; taken: {sorted(STATISTICS)}.")
  STATISTICS[name] = statistic


def check_names(names, *, who: str = "a transform") -> None:
  """Raises naming the statistics `who` asks for that the registry does not hold."""
  unknown = sorted(set(names) - set(STATISTICS))
  if unknown:
    raise ValueError(f"{who} asks for statistics {unknown}; known statistics: {sorted(STATISTICS)} (see `register`).")


def init_states(names, d: int, experts: int | None = None) -> dict[str, Any]:
  """Empty accumulators of `names` for inputs of width `d`, plus the token count; with `experts`, one of each per
  expert (a leading axis) and the router's counts."""
  states = {"tokens": jnp.zeros((), jnp.float32), **{n: STATISTICS[n].init(d) for n in names}}
  if experts is None:
    return states
  return {**jax.tree.map(lambda a: jnp.zeros((experts, *a.shape), a.dtype), states), "routed": jnp.zeros((experts,))}


def update_states(states: dict[str, Any], x: Float[Array, "... d"] | GroupedRows) -> dict[str, Any]:
  """Every accumulator of `states` updated with one batch of inputs (flattened to (tokens, d), float32), or with
  grouped rows, tile by tile, each into its expert's accumulators."""
  if isinstance(x, GroupedRows):
    return _update_grouped(states, x)
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  new = {n: STATISTICS[n].update(s, x) for n, s in states.items() if n != "tokens"}
  return {"tokens": states["tokens"] + x.shape[0], **new}


def _update_grouped(states: dict[str, Any], rows: GroupedRows) -> dict[str, Any]:
  grouped = {n: STATISTICS[n].grouped_update(states[n], rows)
             for n in states if n not in COUNTS and STATISTICS[n].grouped_update is not None}  # fmt: skip
  names = [n for n in states if n not in COUNTS and n not in grouped]

  def tile(acc, x, e):
    x = x.astype(jnp.float32)
    for n in names:
      updated = STATISTICS[n].update(jax.tree.map(lambda s: s[e], acc[n]), x)
      acc[n] = jax.tree.map(lambda s, u: s.at[e].set(u), acc[n], updated)
    return acc, None

  acc = scan_tiles(tile, {n: states[n] for n in names}, rows)[0] if names else {}
  return {"tokens": states["tokens"] + rows.group_sizes, "routed": states["routed"] + rows.routed, **grouped, **acc}


def finalize(states: dict[str, Any]) -> dict[str, Any]:
  """Accumulators -> statistics, e.g. ``hessian`` = XᵀX / n; ``tokens`` is the count itself. Per expert, an expert
  without tokens gets zeros (`qjax.calib.experts` decides what it is given)."""
  n = states["tokens"]
  counts = {k: states[k] for k in COUNTS if k in states}
  if "routed" not in states:
    return {**counts, **{name: STATISTICS[name].finalize(s, n) for name, s in states.items() if name not in COUNTS}}
  per_expert = {name: jax.vmap(STATISTICS[name].finalize)(s, jnp.maximum(n, 1.0))
                for name, s in states.items() if name not in COUNTS}  # fmt: skip
  return {**counts, **per_expert}
