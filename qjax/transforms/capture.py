"""Watching a Flax block run: the inputs of its linears, and the call of one of its modules.

Uses Flax's own method interception (`flax.linen.intercept_methods`), never patched ops: every call of a module
that owns a 2-D ``kernel`` records its first argument. Linears that read the same input (q/k/v read one normed
hidden state, gate/up another) receive the very same traced array, which is how shared inputs are recognised.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jaxtyping import Array


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


def output_shapes(apply_fn: Callable, modules: Sequence[str], *args, **kwargs) -> dict[str, jax.ShapeDtypeStruct]:
  """The shape and dtype of each of `modules`' outputs (traced abstractly, no compute)."""
  found: dict[str, jax.ShapeDtypeStruct] = {}

  def trace(*a, **kw):
    _, _, outputs = capture_linear_inputs(apply_fn, *a, capture=modules, **kw)
    found.update({m: jax.ShapeDtypeStruct(o.shape, o.dtype) for m, o in outputs.items()})

  jax.eval_shape(trace, *args, **kwargs)
  return found


def module_call(apply_fn: Callable, path: str) -> tuple[Callable, dict[str, Any]]:
  """``(run, found)``: ``run(*args)`` applies `apply_fn` and returns ``(args, kwargs, output)`` of the call of the
  module at `path`; after a run, ``found["module"]`` holds that module, unbound, to apply on its own."""
  found: dict[str, Any] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and "/".join(context.module.path) == path:
      found.setdefault("module", context.module.clone(parent=None))
      found["call"] = (args, kwargs, out)
    return out

  def run(*args):
    with nn.intercept_methods(interceptor):
      apply_fn(*args)
    return found["call"]

  return run, found
