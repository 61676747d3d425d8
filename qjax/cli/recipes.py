"""Which recipe `qjax quantize` runs: a registered ``--method`` name, or a user's ``--recipe=FILE.py:function``.

Either way it is a recipe function (`qjax.transforms.recipes`) called with the keyword arguments its signature
names, from the values the command's flags give (`vocabulary`). No string is parsed beyond ``FILE:function``.
"""

import hashlib
import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from typing import Any

from qjax.core import QSpec
from qjax.transforms import recipes
from qjax.transforms.recipes import Recipe


def _rounding(rounding: Recipe) -> Recipe:
  return rounding


def _gptq(gptq_rounding: Recipe) -> Recipe:
  return gptq_rounding


def _awq_gptq(spec: QSpec, gptq_rounding: Recipe) -> Recipe:
  return recipes.awq_gptq(spec, rounding=gptq_rounding)


def _rotate_gptq(gptq_rounding: Recipe, seed: int) -> Recipe:
  return recipes.rotate(seed=seed) + gptq_rounding


def _rotate_awq_gptq(spec: QSpec, gptq_rounding: Recipe, seed: int) -> Recipe:
  return recipes.rotate(seed=seed) + recipes.awq_gptq(spec, rounding=gptq_rounding)


METHODS: dict[str, Callable[..., Recipe]] = {
  "gptq": _gptq,
  "rtn": _rounding,
  "awq": recipes.awq,
  "awq+gptq": _awq_gptq,
  "rotate": recipes.rotate_rtn,
  "rotate+rtn": recipes.rotate_rtn,
  "rotate+gptq": _rotate_gptq,
  "rotate+awq": recipes.rotate_awq,
  "rotate+awq+gptq": _rotate_awq_gptq,
  "lwc": recipes.lwc,
  "none": _rounding,
}
"""``--method`` names -> recipe functions, composed from `qjax.transforms.recipes` with the export's roundings."""

VOCABULARY = {
  "spec": "the grid of --bits, --group_size, --sym (for a GGUF recipe: its main type's sub-block grid)",
  "gptq_config": "GPTQ's --desc_act, --act_group_aware, --static_groups, --damp_percent, --mse",
  "clip": "the MSE clipping search of --mse, or None",
  "rounding": "the export's round-to-nearest: RTN on spec, or llama.cpp's own encoders for --export=gguf:TYPE",
  "gptq_rounding": "GPTQ into the export's grids: on spec, or into a GGUF recipe's per-tensor block types",
  "model_config": "the model's config",
  "seed": "--seed",
}
"""What a recipe function's parameters may be called, and what the command passes for each."""


def call(fn: Callable[..., Recipe], values: dict[str, Any], *, name: str) -> Recipe:
  """Calls a recipe function with the `values` its signature names.

  Raises:
    ValueError: naming a required parameter the command does not supply, or a result that is not a `Recipe`.
  """
  kwargs = {}
  for param in inspect.signature(fn).parameters.values():
    if param.name in values:
      kwargs[param.name] = values[param.name]
    elif param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
      known = ", ".join(VOCABULARY)
      raise ValueError(f"recipe {name} takes a parameter {param.name!r} that qjax quantize cannot supply; it supplies "
                       f"{known}.")  # fmt: skip
  recipe = fn(**kwargs)
  if not isinstance(recipe, Recipe):
    raise ValueError(f"recipe {name} returned {type(recipe).__name__}, not a qjax.Recipe.")
  return recipe


def load_function(reference: str) -> tuple[Callable[..., Recipe], str]:
  """The function named by ``FILE.py:function`` or ``module:function``, and a digest identifying its source.

  Raises:
    ValueError: for a reference without ``:``, a missing file, module or function.
  """
  target, sep, attr = reference.rpartition(":")
  if not sep or not target or not attr:
    raise ValueError(f"--recipe expected FILE.py:function or module:function, got {reference!r}.")
  if target.endswith(".py"):
    if not os.path.isfile(target):
      raise FileNotFoundError(f"--recipe: {target}: no such file.")
    spec = importlib.util.spec_from_file_location(f"qjax_recipe_{hashlib.sha256(target.encode()).hexdigest()[:8]}",
                                                  target)  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(target, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  else:
    try:
      module = importlib.import_module(target)
    except ImportError as e:
      raise ValueError(f"--recipe: cannot import module {target!r} ({e}).") from e
    digest = target
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"--recipe: {target} has no function {attr!r}.")
  return fn, digest
