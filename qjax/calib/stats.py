"""Calibration statistics of the inputs of a block's linear layers, accumulated in jitted code.

The inputs are captured with Flax's own method interception (`flax.linen.intercept_methods`):
every call of a module that owns a 2-D ``kernel`` records its first argument. Linears that
read the same input (q/k/v read one normed hidden state, gate/up another) receive the very
same traced array, so their statistics are computed once and shared.

Statistics (per linear, over all calibration tokens ``x`` of its ``in`` inputs):

* ``hessian``: ``XᵀX / n``, (in, in) float32 (GPTQ's H up to a factor 2).
* ``imatrix``: ``mean(x²)`` per input column, (in,) float32 (llama.cpp's importance matrix).
* ``abs_mean``: ``mean(|x|)`` per input column, (in,) float32 (AWQ's activation salience).
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

STAT_NAMES = ("hessian", "imatrix", "abs_mean")
BLOCK_INPUTS = "block_inputs"
"""Not a statistic: a transform that names it runs the block on its inputs itself, on the whole block at once."""


def _is_linear(module: nn.Module) -> bool:
  params = module.variables.get("params", {}) if module.scope is not None else {}
  return "kernel" in params


def capture_linear_inputs(
  apply_fn: Callable, *args, cached: dict[str, Array] | None = None, capture: Sequence[str] = (), **kwargs
) -> tuple[object, dict[str, Array], dict[str, Array]]:
  """Runs `apply_fn(*args, **kwargs)`, recording the input of every linear it calls.

  Args:
    apply_fn: a function that applies a Flax module.
    *args, **kwargs: its arguments.
    cached: linear module path -> output to use instead of calling that linear (its
      params are final and its input unchanged, so its output is known).
    capture: linear module paths whose outputs to record.

  Returns:
    (the function's result, {module path: input (..., in)}, {captured module path: output}).
  """
  cached = cached or {}
  inputs: dict[str, Array] = {}
  outputs: dict[str, Array] = {}

  def interceptor(next_fun, fn_args, fn_kwargs, context):
    if context.method_name != "__call__" or not _is_linear(context.module):
      return next_fun(*fn_args, **fn_kwargs)
    path = "/".join(context.module.path)
    inputs[path] = fn_args[0]
    out = cached[path] if path in cached else next_fun(*fn_args, **fn_kwargs)
    if path in capture:
      outputs[path] = out
    return out

  with nn.intercept_methods(interceptor):
    out = apply_fn(*args, **kwargs)
  return out, inputs, outputs


def input_sums(x: Float[Array, "... d"], names: Sequence[str]) -> dict[str, Array]:
  """Sums over tokens of one input: ``{"count", "hessian", "imatrix", "abs_mean"}`` as requested."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  sums = {"count": jnp.asarray(x.shape[0], jnp.float32)}
  if "hessian" in names:
    sums["hessian"] = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)
  if "imatrix" in names:
    sums["imatrix"] = jnp.sum(x * x, axis=0)
  if "abs_mean" in names:
    sums["abs_mean"] = jnp.sum(jnp.abs(x), axis=0)
  return sums


def shared_inputs(apply_fn: Callable, modules: Sequence[str], *args, **kwargs) -> dict[str, str]:
  """Maps each of `modules` to the first module reading the same input (traced abstractly, no compute).

  Raises:
    ValueError: naming modules the block never calls.
  """
  aliases: dict[str, str] = {}

  def trace(*a, **kw):
    _, captured, _ = capture_linear_inputs(apply_fn, *a, **kw)
    missing = [m for m in modules if m not in captured]
    if missing:
      raise ValueError(f"linear modules {missing} were not called; the block calls {sorted(captured)}.")
    first: dict[int, str] = {}
    for module in modules:
      aliases[module] = first.setdefault(id(captured[module]), module)

  jax.eval_shape(trace, *args, **kwargs)
  return aliases


def linear_input_sums(
  apply_fn: Callable,
  representatives: Sequence[str],
  names: Sequence[str],
  *args,
  cached: dict[str, Array] | None = None,
  capture: Sequence[str] = (),
) -> tuple[dict[str, dict[str, Array]], dict[str, Array]]:
  """Statistic sums of the inputs of `representatives` (one module per distinct input) for one batch.

  Under jit, everything the requested inputs do not depend on is pruned, so collecting
  the inputs of ``o_proj`` costs only the attention half of a block, and linears whose
  outputs are `cached` are not computed at all.

  Returns:
    ({module: sums}, {captured module: output}).
  """
  _, inputs, outputs = capture_linear_inputs(apply_fn, *args, cached=cached, capture=capture)
  return {m: input_sums(inputs[m], names) for m in representatives}, outputs


def add_sums(total: dict | None, batch: dict) -> dict:
  return batch if total is None else jax.tree.map(jnp.add, total, batch)


def finalize(sums: dict[str, Array]) -> dict[str, Array]:
  """Sums -> means (``hessian`` = XᵀX / n, ``imatrix`` = mean x², ``abs_mean`` = mean |x|)."""
  n = sums["count"]
  return {k: v / n for k, v in sums.items() if k != "count"} | {"tokens": n}
