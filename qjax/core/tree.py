"""Parameter trees by path: '/'-joined key paths, `QArray`s as leaves, and flat named arrays for storage.

A leaf's path is its keys joined by '/', e.g. ``model/layers_3/mlp/down_proj/kernel``: what rules match, what
statistics and reports are keyed by, and how a tree is stored as named tensors (`flatten_params`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core.errors import InputError
from qjax.core.fp_grid import Fp8Grid, MxFp4Grid, NvFp4Grid, valid_global_scale
from qjax.core.grid import Grid
from qjax.core.qarray import QArray, is_qarray
from qjax.core.qspec import QSpec

Params = Any
FORMAT_VERSION = 1
QARRAY_FIELDS = ("codes", "scale", "zero", "perm")


class MaskedNode(NamedTuple):
  """Stands in for a leaf a masked transform must not see (as `optax.MaskedNode`)."""


def _is_leaf(x) -> bool:
  return is_qarray(x) or isinstance(x, MaskedNode)


def path_str(path: tuple) -> str:
  """'/'-joined keys of a pytree key path, e.g. ``'model/layers/0/mlp/up_proj/kernel'``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def leaves_with_paths(params: Params) -> list[tuple[str, Any]]:
  """``(path, leaf)`` pairs, treating `QArray` (and `MaskedNode`) as leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_leaf)
  return [(path_str(p), leaf) for p, leaf in flat]


def map_with_path(fn: Callable[..., Any], tree: Params, *rest: Params) -> Params:
  """`jax.tree.map` whose function also gets the leaf's '/'-joined path; QArrays are leaves."""
  return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest, is_leaf=_is_leaf)


def get_path(tree: Params, path: str) -> Any:
  """The subtree of nested dicts at a '/'-joined `path`."""
  for key in path.split("/"):
    tree = tree[key]
  return tree


def replace_path(tree: dict, path: str, value) -> dict:
  """A copy of nested dicts with the subtree at `path` replaced (the rest shared, not copied)."""
  key, _, rest = path.partition("/")
  return {**tree, key: value if not rest else replace_path(tree[key], rest, value)}


def nest(path: str, subtree) -> dict:
  """`subtree` placed at `path` in otherwise empty dicts: ``nest("a/b", x) == {"a": {"b": x}}``."""
  for key in reversed(path.split("/")):
    subtree = {key: subtree}
  return subtree


NAMED_GRIDS = ("fp8", "mxfp4", "nvfp4")
"""Grids other than the default one that a spec stores by name: `Fp8Grid` (with the spec's scale dtype),
`MxFp4Grid` and `NvFp4Grid` (with its global scale)."""


def grid_name(spec: QSpec) -> str | None:
  """``"fp8"``, ``"mxfp4"`` or ``"nvfp4"`` for the floating-point grids, None for the grid the other fields imply.

  Raises:
    ValueError: for any other grid (a custom grid cannot be stored by name), or an NVFP4 grid without its global
      scale.
  """
  grid = spec.grid
  if grid is None:
    return None
  if isinstance(grid, Fp8Grid):
    if grid != Fp8Grid(scale_dtype=spec.scale_dtype):
      raise ValueError(f"an FP8 QArray's grid stores scales in its spec's {spec.scale_dtype}, got {grid}.")
    return "fp8"
  if grid == MxFp4Grid():
    return "mxfp4"
  if isinstance(grid, NvFp4Grid):
    if not grid.fixed:
      raise ValueError("an NVFP4 QArray's grid needs its global scale; quantize with rtn_quantize or gptq_quantize.")
    return "nvfp4"
  raise ValueError(
    f"a QArray on the custom grid {grid!r} cannot be stored by name; dequantize it, or store the grid's codes and "
    "parameters yourself."
  )


def named_grid(name: str, scale_dtype: np.dtype, global_scale: float | None = None) -> Grid:
  """The grid `grid_name` names (NVFP4's with `global_scale`, a positive finite number)."""
  if name not in NAMED_GRIDS:
    raise ValueError(f"grid expected one of {NAMED_GRIDS}, got {name!r}")
  if name == "nvfp4":
    if isinstance(global_scale, bool) or not isinstance(global_scale, (int, float)):
      raise ValueError(f"an nvfp4 grid expected a number as global_scale, got {global_scale!r}")
    if not valid_global_scale(global_scale):
      raise ValueError(f"an nvfp4 grid expected a positive finite global_scale above 1e-35, got {global_scale!r}")
    return NvFp4Grid(global_scale=float(global_scale))
  return Fp8Grid(scale_dtype=np.dtype(scale_dtype)) if name == "fp8" else MxFp4Grid()


def spec_to_json(spec: QSpec) -> dict:
  """A spec as JSON; the grid is implied by the other fields, or one of `NAMED_GRIDS` (NVFP4's with its
  ``global_scale``)."""
  name = grid_name(spec)
  d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "grid"}
  d["scale_dtype"] = str(spec.scale_dtype)
  if name == "nvfp4":
    d["global_scale"] = spec.grid.global_scale
  return d if name is None else {**d, "grid": name}


def spec_from_json(d: dict) -> QSpec:
  d = dict(d)
  scale_dtype = np.dtype(d["scale_dtype"])
  global_scale = d.pop("global_scale", None)
  if global_scale is not None and d.get("grid") != "nvfp4":
    raise ValueError(f"global_scale belongs to the nvfp4 grid, got grid {d.get('grid')!r}")
  grid = None if d.get("grid") is None else named_grid(d["grid"], scale_dtype, global_scale)
  return QSpec(**{**d, "scale_dtype": scale_dtype, "grid": grid})


def flatten_params(params: Params) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A parameter tree as flat named arrays plus a JSON manifest describing its `QArray` leaves.

  A dense leaf is stored under its path; a `QArray` under ``PATH:codes``, ``PATH:scale``, ``PATH:zero`` and
  ``PATH:perm`` (those present), with its spec, shape, dtype and axis in the manifest.
  """
  tensors, quantized = {}, {}
  for path, leaf in leaves_with_paths(params):
    if is_qarray(leaf):
      quantized[path] = {"spec": spec_to_json(leaf.spec), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                         "axis": leaf.axis}  # fmt: skip
      for field in QARRAY_FIELDS:
        value = getattr(leaf, field)
        if value is not None:
          tensors[f"{path}:{field}"] = np.asarray(value)
    else:
      tensors[path] = np.asarray(leaf)
  return tensors, {"format_version": FORMAT_VERSION, "quantized": quantized}


def unflatten_params(tensors: dict[str, np.ndarray], manifest: dict[str, Any], *, source: str) -> dict:
  """Inverse of `flatten_params`.

  Raises:
    InputError: naming `source` and the leaf when the manifest is malformed, a quantized leaf has no codes, or its
      entry cannot build a `QArray` (e.g. an invalid spec).
  """
  quantized = manifest.get("quantized") if isinstance(manifest, dict) else None
  if not isinstance(quantized, dict):
    raise InputError(f"{source}: the manifest's 'quantized' expected an object of leaf path -> entry.")
  params: dict = {}
  for path, info in quantized.items():
    fields = {k: tensors.get(f"{path}:{k}") for k in QARRAY_FIELDS}
    if fields["codes"] is None:
      raise InputError(f"{source}: quantized tensor {path!r} has no codes.")
    try:
      leaf = QArray(
        **{k: None if v is None else jnp.asarray(v) for k, v in fields.items()},
        spec=spec_from_json(info["spec"]),
        shape=tuple(info["shape"]),
        dtype=np.dtype(info["dtype"]),
        axis=info["axis"],
      )
    except (KeyError, TypeError, ValueError) as e:
      raise InputError(f"{source}: quantized tensor {path!r} has an invalid manifest entry ({e}).") from e
    params = _set(params, path, leaf)
  for name, value in tensors.items():
    if ":" not in name:
      params = _set(params, name, value)
  return params


def _set(tree: dict, path: str, value) -> dict:
  *parents, last = path.split("/")
  node = tree
  for key in parents:
    node = node.setdefault(key, {})
  node[last] = value
  return tree
