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

from qjax.core.affine import AffineGrid
from qjax.core.errors import InputError
from qjax.core.fp_grid import Fp8Grid, MxFp4Grid, NvFp4Grid, valid_global_scale
from qjax.core.grid import Grid
from qjax.core.per_tensor import PerTensorGrid
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


NAMED_GRIDS = ("fp8", "mxfp4", "nvfp4", "tensor-affine", "tensor-fp8")
"""Grids other than the default one that a spec stores by name: `Fp8Grid` (with the spec's scale dtype),
`MxFp4Grid`, `NvFp4Grid` (with its ``global_scale``) and `PerTensorGrid` over the spec's symmetric affine grid or
its `Fp8Grid` (with its ``tensor_scale``)."""


def grid_name(spec: QSpec) -> str | None:
  """The `NAMED_GRIDS` name of `spec`'s grid, None for the grid the other fields imply.

  Raises:
    ValueError: for any other grid (a custom grid cannot be stored by name), or a grid whose per-tensor parameter
      is not set.
  """
  grid = spec.grid
  if grid is None:
    return None
  if isinstance(grid, (NvFp4Grid, PerTensorGrid)) and not grid.fixed:
    raise ValueError(f"a QArray's {type(grid).__name__} needs its per-tensor scale; quantize with rtn_quantize or "
                     "gptq_quantize.")  # fmt: skip
  if isinstance(grid, PerTensorGrid):
    grid, prefix = grid.grid, "tensor-"
  else:
    prefix = ""
  if isinstance(grid, Fp8Grid):
    if grid != Fp8Grid(scale_dtype=spec.scale_dtype):
      raise ValueError(f"an FP8 QArray's grid stores scales in its spec's {spec.scale_dtype}, got {grid}.")
    return f"{prefix}fp8"
  if prefix and grid == AffineGrid(bits=spec.bits, symmetric=spec.symmetric, scale_dtype=spec.scale_dtype):
    return "tensor-affine"
  if grid == MxFp4Grid():
    return "mxfp4"
  if isinstance(grid, NvFp4Grid):
    return "nvfp4"
  raise ValueError(
    f"a QArray on the custom grid {spec.grid!r} cannot be stored by name; dequantize it, or store the grid's codes "
    "and parameters yourself."
  )


def _positive_float(value, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < np.inf:
    raise ValueError(f"{what} expected a positive finite number, got {value!r}")
  return float(value)


def named_grid(spec: QSpec, name: str, tensor_param: float | None = None) -> Grid:
  """The grid `grid_name` names, for `spec`'s other fields; `tensor_param` is NVFP4's global scale or a
  `PerTensorGrid`'s scale."""
  if name not in NAMED_GRIDS:
    raise ValueError(f"grid expected one of {NAMED_GRIDS}, got {name!r}")
  if name == "nvfp4":
    if (
      isinstance(tensor_param, bool)
      or not isinstance(tensor_param, (int, float))
      or not valid_global_scale(tensor_param)
    ):
      raise ValueError(f"an nvfp4 grid expected a positive finite global_scale above 1e-35, got {tensor_param!r}")
    return NvFp4Grid(global_scale=float(tensor_param))
  if name == "mxfp4":
    return MxFp4Grid()
  fp8 = Fp8Grid(scale_dtype=spec.scale_dtype)
  if name == "fp8":
    return fp8
  inner = fp8 if name == "tensor-fp8" else AffineGrid(bits=spec.bits, symmetric=True, scale_dtype=spec.scale_dtype)
  return PerTensorGrid(grid=inner, scale=_positive_float(tensor_param, f"a {name} grid's tensor_scale"))


TENSOR_PARAMS = {"nvfp4": "global_scale", "tensor-affine": "tensor_scale", "tensor-fp8": "tensor_scale"}


def spec_to_json(spec: QSpec) -> dict:
  """A spec as JSON; the grid is implied by the other fields, or one of `NAMED_GRIDS` (with its per-tensor
  parameter, `TENSOR_PARAMS`)."""
  name = grid_name(spec)
  d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "grid"}
  d["scale_dtype"] = str(spec.scale_dtype)
  if name in TENSOR_PARAMS:
    d[TENSOR_PARAMS[name]] = spec.grid.global_scale if name == "nvfp4" else spec.grid.scale
  return d if name is None else {**d, "grid": name}


def spec_from_json(d: dict) -> QSpec:
  d = dict(d)
  name = d.pop("grid", None)
  params = {key: d.pop(key) for key in set(TENSOR_PARAMS.values()) if key in d}
  wanted = TENSOR_PARAMS.get(name)
  extra = sorted(set(params) - {wanted})
  if extra:
    owner = "nvfp4" if extra[0] == "global_scale" else "tensor-affine or tensor-fp8"
    raise ValueError(f"{extra[0]} belongs to the {owner} grid, got grid {name!r}")
  spec = QSpec(**{**d, "scale_dtype": np.dtype(d["scale_dtype"])})
  return spec if name is None else dataclasses.replace(spec, grid=named_grid(spec, name, params.get(wanted)))


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
