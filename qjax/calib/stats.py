"""Statistics of the inputs of a block's linear layers, as a registry of accumulators run in jitted code.

A transform names the statistics it reads (``Transform.stats``); the runner looks them up here, accumulates each
over the calibration batches (``update`` on each batch of inputs, inside the same jitted step that runs the
block) and hands the transform ``finalize``'s result, keyed by kernel path, plus the token count as ``"tokens"``.
Linears that read the same input (q/k/v, gate/up) share one accumulator. A new statistic is one `Statistic`
value: add it to `STATISTICS` (`register`), and any transform can name it.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_HIGHEST = jax.lax.Precision.HIGHEST


class Statistic(NamedTuple):
  """An accumulator over the inputs ``x`` (tokens, d) of a linear.

  Attributes:
    init: ``d -> state``, the empty accumulator (float32 arrays).
    update: ``(state, x) -> state`` for one batch of inputs, x float32 (tokens, d).
    finalize: ``(state, tokens) -> value``, tokens the float32 count of all inputs seen.
  """

  init: Callable[[int], Any]
  update: Callable[[Any, Float[Array, "tokens d"]], Any]
  finalize: Callable[[Any, Float[Array, ""]], Any]


def _mean(term: Callable[[Array], Array], shape: Callable[[int], tuple[int, ...]]) -> Statistic:
  return Statistic(
    init=lambda d: jnp.zeros(shape(d), jnp.float32),
    update=lambda s, x: s + term(x),
    finalize=lambda s, n: s / n,
  )


STATISTICS: dict[str, Statistic] = {
  # XᵀX / n, (d, d): GPTQ's Hessian up to a factor 2.
  "hessian": _mean(lambda x: jnp.dot(x.T, x, precision=_HIGHEST), lambda d: (d, d)),
  # mean x² per input channel, (d,): llama.cpp's importance matrix.
  "imatrix": _mean(lambda x: jnp.sum(x * x, axis=0), lambda d: (d,)),
  # mean |x| per input channel, (d,): AWQ's activation salience.
  "abs_mean": _mean(lambda x: jnp.sum(jnp.abs(x), axis=0), lambda d: (d,)),
  # max |x| per input channel, (d,): SmoothQuant's activation range.
  "abs_max": Statistic(
    init=lambda d: jnp.zeros((d,), jnp.float32),
    update=lambda s, x: jnp.maximum(s, jnp.max(jnp.abs(x), axis=0)),
    finalize=lambda s, n: s,
  ),
}


def register(name: str, statistic: Statistic) -> None:
  """Adds a statistic transforms can name.

  Raises:
    ValueError: if `name` is taken.
  """
  if name in STATISTICS or name == "tokens":
    raise ValueError(f"`register` expected a new statistic name, got {name!r}; taken: {sorted(STATISTICS)}.")
  STATISTICS[name] = statistic


def check_names(names, *, who: str = "a transform") -> None:
  """Raises naming the statistics `who` asks for that the registry does not hold."""
  unknown = sorted(set(names) - set(STATISTICS))
  if unknown:
    raise ValueError(f"{who} asks for statistics {unknown}; known statistics: {sorted(STATISTICS)} (see `register`).")


def init_states(names, d: int) -> dict[str, Any]:
  """Empty accumulators of `names` for inputs of width `d`, plus the token count."""
  return {"tokens": jnp.zeros((), jnp.float32), **{n: STATISTICS[n].init(d) for n in names}}


def update_states(states: dict[str, Any], x: Float[Array, "... d"]) -> dict[str, Any]:
  """Every accumulator of `states` updated with one batch of inputs (flattened to (tokens, d), float32)."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  new = {n: STATISTICS[n].update(s, x) for n, s in states.items() if n != "tokens"}
  return {"tokens": states["tokens"] + x.shape[0], **new}


def finalize(states: dict[str, Any]) -> dict[str, Any]:
  """Accumulators -> statistics, e.g. ``hessian`` = XᵀX / n; ``tokens`` is the count itself."""
  n = states["tokens"]
  return {"tokens": n, **{name: STATISTICS[name].finalize(s, n) for name, s in states.items() if name != "tokens"}}
