"""compressed-tensors checkpoints (vLLM's native format, written by llm-compressor): qjax params to a Hugging Face
directory and back.

Integer weights use the ``pack-quantized`` format. A quantized linear ``model.layers.{i}.mlp.down_proj`` whose torch
weight is ``W [out, in]`` is stored as

* ``weight_packed`` (out, ceil(in * bits / 32)) int32: each row's codes, offset to ``[0, 2**bits)``, as one
  little-endian bit stream (code ``t`` at bit ``bits * t``; a row is padded with zeros to whole runs of 32 codes,
  then cut to the words it needs);
* ``weight_scale`` (out, groups) in the model's float dtype: ``groups = in / group_size`` (strategy ``group``), 1
  (``channel``), or shape (1,) for one scale per tensor (``tensor``);
* ``weight_zero_point``, asymmetric only: the zero points, offset as the codes are, packed the same way along
  ``out`` into (ceil(out * bits / 32), groups) int32 (``tensor``: (1,) int8, signed and unpacked);
* ``weight_shape`` (2,) int64, ``[out, in]``;
* ``weight_g_idx`` (in,) int32, the group of each input channel: only in older checkpoints with ``actorder:
  group`` (read, not written: compressed-tensors 0.20 refuses that setting, see `ACTORDER_GROUP_MSG`).

``W[o, i] = scale[o, g] * (code[o, i] - zero[o, g])`` with ``g = i // group_size`` (or ``g_idx[i]``), and a
symmetric grid's zero point is the fixed ``2**(bits-1)``. These are exactly a qjax `QArray`'s unsigned codes,
scales and zero points, so writing and reading copy them.

FP8 weights (`qjax.core.fp_grid.Fp8Grid`) use the ``float-quantized`` format: ``weight`` (out, in) float8_e4m3fn,
the codes themselves, and ``weight_scale`` (out, groups), ``W = float(weight) * scale``. MXFP4 weights
(`qjax.core.fp_grid.MxFp4Grid`) use ``mxfp4-pack-quantized``: ``weight_packed`` (out, in / 2) uint8, two E2M1 codes
a byte (the even input in the low nibble), and ``weight_scale`` (out, in / 32) uint8, the E8M0 exponent bytes,
``W = e2m1(code) * 2**(scale - 127)``. NVFP4 weights (`qjax.core.fp_grid.NvFp4Grid`, strategy ``tensor_group``) use
``nvfp4-pack-quantized``: ``weight_packed`` as MXFP4's, ``weight_scale`` (out, in / 16) float8_e4m3fn and
``weight_global_scale`` (1,) float32, ``W = e2m1(code) * (float(scale) / global_scale)``.

``config.json["quantization_config"]`` says ``quant_method: compressed-tensors``, ``format: pack-quantized``,
``quantization_status: compressed``, and the schemes: ``config_groups`` (each ``targets``, module names, ``re:``
regular expressions or the class ``Linear``, with ``weights`` arguments) minus ``ignore``.

References: the ``compressed-tensors`` package (``compressors/pack_quantized``, ``quantization/quant_args.py``,
``utils/match.py``); vLLM ``compressed_tensors_wNa16.py``.
"""

import dataclasses
import os
import re
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax.core import AffineGrid, GroupParams, QArray, QSpec, is_qarray, packing
from qjax.core.errors import InputError
from qjax.core.fp_grid import Fp8Grid, MxFp4Grid, NvFp4Grid, valid_global_scale
from qjax.core.per_tensor import PerTensorGrid
from qjax.core.qarray import unpacked_codes
from qjax.core.tree import leaves_with_paths
from qjax.formats import gptq, hf_quantized
from qjax.formats.output import atomic_directory
from qjax.models.checkpoint import check_finite, check_group_length, split_experts
from qjax.models.config import MAX_SIZE, LlamaConfig, show

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
MXFP4_PACK_QUANTIZED = "mxfp4-pack-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"
FORMATS = (PACK_QUANTIZED, FLOAT_QUANTIZED, MXFP4_PACK_QUANTIZED, NVFP4_PACK_QUANTIZED)
STRATEGIES = ("group", "channel", "tensor", "tensor_group")
MARKER = "weight_scale"  # the tensor every quantized linear has, in every format

ACTORDER_GROUP_MSG = (
  "{name}: act-order with groups in activation order (actorder 'group', a weight_g_idx) cannot be written: "
  "compressed-tensors 0.20 refuses that setting, so transformers and vLLM with a current compressed-tensors would "
  "not load the file. Quantize with --static_groups (groups in input order; written as actorder 'weight'), drop "
  "--desc_act, or export with --export=gptq."
)


class WeightArgs(NamedTuple):
  """The ``weights`` arguments of one compressed-tensors scheme that qjax reads and writes.

  Attributes:
    num_bits: code width.
    symmetric: no stored zero point (the fixed ``2**(bits-1)``).
    strategy: ``"group"``, ``"channel"``, ``"tensor"`` or ``"tensor_group"`` (NVFP4: groups and a global scale).
    group_size: inputs per group for ``"group"`` and ``"tensor_group"``, else None.
    actorder: None, ``"weight"`` (act-order during calibration only, groups in input order) or ``"group"``
      (groups in activation order, a ``weight_g_idx``; read only).
    kind: ``"int"`` (``pack-quantized``) or ``"float"`` (FP8 E4M3 ``float-quantized``; 4-bit: MXFP4 or NVFP4).
  """

  num_bits: int
  symmetric: bool
  strategy: str
  group_size: int | None = None
  actorder: str | None = None
  kind: str = "int"

  @property
  def format(self) -> str:
    if self.kind == "int":
      return PACK_QUANTIZED
    if self.num_bits == 8:
      return FLOAT_QUANTIZED
    return NVFP4_PACK_QUANTIZED if self.strategy == "tensor_group" else MXFP4_PACK_QUANTIZED

  def qspec(self, scale_dtype, tensor_param: float | None = None) -> QSpec:
    """The spec of a layer stored with these arguments; `tensor_param` is an NVFP4 layer's global scale or a
    symmetric ``tensor`` layer's one scale (a `PerTensorGrid`; with a zero point, scales per channel)."""
    group_size = self.group_size if self.strategy in ("group", "tensor_group") else -1
    if self.format == MXFP4_PACK_QUANTIZED:  # the grid's scales are E8M0 bytes, not floats
      return QSpec(bits=4, group_size=group_size, grid=MxFp4Grid())
    if self.format == NVFP4_PACK_QUANTIZED:  # E4M3 scale bytes
      return QSpec(bits=4, group_size=group_size, grid=NvFp4Grid(global_scale=tensor_param))
    scale_dtype = np.dtype(scale_dtype)
    grid = Fp8Grid(scale_dtype=scale_dtype) if self.kind == "float" else None
    if self.strategy == "tensor" and self.symmetric:
      inner = grid or AffineGrid(bits=self.num_bits, symmetric=True, scale_dtype=scale_dtype)
      grid = PerTensorGrid(grid=inner, scale=tensor_param)
    return QSpec(bits=self.num_bits, group_size=group_size, symmetric=self.symmetric, scale_dtype=scale_dtype,
                 grid=grid)  # fmt: skip

  def as_json(self) -> dict[str, Any]:
    args = {
      "num_bits": self.num_bits,
      "type": self.kind,
      "symmetric": self.symmetric,
      "group_size": self.group_size,
      "strategy": self.strategy,
      "dynamic": False,
    }
    if self.format == NVFP4_PACK_QUANTIZED:
      args["scale_dtype"] = "torch.float8_e4m3fn"  # as compressed-tensors' NVFP4A16 preset serialises it
    return args if self.actorder is None else {**args, "actorder": self.actorder}


FLOAT_GRIDS = (Fp8Grid, MxFp4Grid, NvFp4Grid)


def _grid(spec: QSpec):
  """The grid whose codes are stored: a `PerTensorGrid`'s inner grid (its one scale is the ``tensor`` strategy)."""
  grid = spec.rounding_grid
  return grid.grid if isinstance(grid, PerTensorGrid) else grid


def weight_args(spec: QSpec, *, actorder: str | None = None) -> WeightArgs:
  """The scheme arguments of a qjax spec (group size -1 is the ``channel`` strategy; `Fp8Grid` is FP8, `MxFp4Grid`
  MXFP4, `NvFp4Grid` NVFP4's ``tensor_group`` and `PerTensorGrid` the ``tensor`` strategy)."""
  kind = "float" if isinstance(_grid(spec), FLOAT_GRIDS) else "int"
  if isinstance(spec.rounding_grid, NvFp4Grid):
    return WeightArgs(4, True, "tensor_group", spec.group_size, actorder, kind)
  if isinstance(spec.rounding_grid, PerTensorGrid):
    return WeightArgs(spec.bits, True, "tensor", None, actorder, kind)
  if spec.group_size == -1:
    return WeightArgs(spec.bits, spec.symmetric, "channel", None, actorder, kind)
  return WeightArgs(spec.bits, spec.symmetric, "group", spec.group_size, actorder, kind)


# ---- the bit stream ----


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
  """(rows, n) codes in ``[0, 2**bits)`` -> (rows, ceil(n * bits / 32)) int32 words, as compressed-tensors packs."""
  rows, n = codes.shape
  padded = np.zeros((rows, -(-n // 32) * 32), np.uint32)
  padded[:, :n] = codes
  words = np.asarray(gptq.pack_codes(padded, bits=bits, axis=1))
  return np.ascontiguousarray(words[:, : -(-n * bits // 32)]).view(np.int32)


def unpack_rows(words: np.ndarray, bits: int, n: int) -> np.ndarray:
  """The inverse of `pack_rows`: (rows, ceil(n * bits / 32)) int32 -> (rows, n) uint8 codes."""
  rows, count = words.shape
  padded = np.zeros((rows, -(-count // bits) * bits), np.uint32)  # whole runs of 32 codes
  padded[:, :count] = words.view(np.uint32)
  return np.asarray(gptq.unpack_codes(padded, bits=bits, axis=1))[:, :n]


# ---- one QArray <-> compressed tensors ----


def to_compressed(q: QArray, *, name: str = "weight") -> dict[str, np.ndarray]:
  """A Dense-kernel `QArray` as ``pack-quantized`` tensors (``weight_packed``, ``weight_scale``, ``weight_shape``
  and, with a zero point, ``weight_zero_point``).

  Raises:
    ValueError: for a ggml layout, an act-order permutation (`ACTORDER_GROUP_MSG`), or a group size that does not
      divide the input width (compressed-tensors has no shorter last group).

  Examples:
    >>> from qjax.core import quantize
    >>> q = quantize(np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8), QSpec(bits=4, group_size=32))
    >>> {k: v.shape for k, v in to_compressed(q).items()}
    {'weight_packed': (8, 8), 'weight_scale': (8, 2), 'weight_shape': (2,)}
  """
  if isinstance(_grid(q.spec), FLOAT_GRIDS):
    return _float_tensors(q, name)
  if isinstance(q.spec.rounding_grid, PerTensorGrid):  # integer codes, one scale
    q = dataclasses.replace(q, spec=dataclasses.replace(q.spec, grid=q.spec.rounding_grid.grid))
    return {**to_compressed(q, name=name), "weight_scale": np.asarray(q.scale).reshape(-1)[:1].copy()}
  gptq.check_packed_linear(q, name, "to_compressed")
  if q.perm is not None:
    raise ValueError(ACTORDER_GROUP_MSG.format(name=name))
  k, n = q.canonical_shape
  if q.spec.group_size != -1 and k % q.spec.group_size:
    raise ValueError(
      f"`to_compressed` expected group_size to divide the input width of {name}, got group_size="
      f"{q.spec.group_size} for in={k}; compressed-tensors has no shorter last group."
    )
  bits = q.spec.bits
  tensors = {
    "weight_packed": pack_rows(np.asarray(unpacked_codes(q)).T, bits),
    "weight_scale": np.ascontiguousarray(np.asarray(q.scale).T),
    "weight_shape": np.array([n, k], np.int64),
  }
  if q.zero is not None:
    tensors["weight_zero_point"] = np.ascontiguousarray(pack_rows(np.asarray(q.zero, np.uint32), bits).T)
  return tensors


def _float_tensors(q: QArray, name: str) -> dict[str, np.ndarray]:
  """The tensors of an FP8 QArray (``float-quantized``: the E4M3 codes as ``weight``), an MXFP4 or NVFP4 one
  (``mxfp4-pack-quantized``, ``nvfp4-pack-quantized``: two codes a byte), and the scales."""
  if q.axis != 0 or q.perm is not None or q.spec.layout != "packed":
    raise ValueError(f"`to_compressed` expected a packed Dense kernel without act-order for {name}.")
  codes = np.ascontiguousarray(np.asarray(unpacked_codes(q)).astype(np.uint8).T)  # (out, in)
  scale = np.ascontiguousarray(np.asarray(q.scale).T)
  if isinstance(q.spec.rounding_grid, PerTensorGrid):
    scale = scale.reshape(-1)[:1].copy()  # the tensor strategy's one scale
  if isinstance(_grid(q.spec), Fp8Grid):
    return {"weight": codes.view(ml_dtypes.float8_e4m3fn), "weight_scale": scale}
  packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
  grid = q.spec.rounding_grid
  group = 16 if isinstance(grid, NvFp4Grid) else 32
  if q.spec.group_size != group:
    raise ValueError(f"`to_compressed` expected {type(grid).__name__} groups of {group} for {name}, "
                     f"got {q.spec.group_size}.")  # fmt: skip
  if isinstance(grid, MxFp4Grid):
    return {"weight_packed": packed, "weight_scale": scale}
  return {
    "weight_packed": packed,
    "weight_scale": scale.view(ml_dtypes.float8_e4m3fn),
    "weight_global_scale": np.array([grid.global_scale], np.float32),
  }


def expected_shapes(args: WeightArgs, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
  """The stored shape of each tensor of a (k, n) linear (``weight_g_idx`` included for ``actorder: group``)."""
  k, n = shape
  bits = args.num_bits
  groups = {"channel": 1, "tensor": 0}.get(args.strategy)
  groups = -(-k // args.group_size) if groups is None else groups
  scale = (1,) if args.strategy == "tensor" else (n, groups)
  if args.format == FLOAT_QUANTIZED:
    return {"weight": (n, k), "weight_scale": scale}
  if args.format == MXFP4_PACK_QUANTIZED:
    return {"weight_packed": (n, k // 2), "weight_scale": scale}
  if args.format == NVFP4_PACK_QUANTIZED:
    return {"weight_packed": (n, k // 2), "weight_scale": scale, "weight_global_scale": (1,)}
  shapes = {"weight_packed": (n, -(-k * bits // 32)), "weight_scale": scale, "weight_shape": (2,)}
  if not args.symmetric:
    shapes["weight_zero_point"] = (1,) if args.strategy == "tensor" else (-(-n * bits // 32), groups)
  if args.actorder == "group":
    shapes["weight_g_idx"] = (k,)
  return shapes


def check_compressed_tensors(
  t: dict[str, np.ndarray], args: WeightArgs, shape: tuple[int, int], name: str, *, source: str | None = None
) -> None:
  """Raises naming the tensor when a layer's tensors do not have the shapes and dtypes its scheme implies, a
  ``weight_shape`` other than the config's, a ``weight_g_idx`` naming a group that does not exist, or NaN or Inf
  scales."""
  k, n = shape
  prefix = f"{source}: " if source else ""
  if args.strategy in ("group", "tensor_group"):
    check_group_length(args.group_size, k, f"{prefix}{name}")
    if k % args.group_size:
      raise InputError(
        f"{prefix}{name}: group_size={args.group_size} does not divide in={k}; compressed-tensors has no shorter "
        "last group."
      )
  described = f"{args.num_bits}-bit {args.strategy} compressed-tensors of a ({n}, {k}) linear"
  mxfp4, nvfp4 = args.format == MXFP4_PACK_QUANTIZED, args.format == NVFP4_PACK_QUANTIZED
  float_scales = (np.float16, np.float32, jnp.bfloat16)
  dtypes = {
    "weight": (ml_dtypes.float8_e4m3fn,),
    "weight_packed": (np.uint8,) if mxfp4 or nvfp4 else (np.int32,),
    "weight_scale": (np.uint8,) if mxfp4 else (ml_dtypes.float8_e4m3fn,) if nvfp4 else float_scales,
    "weight_global_scale": (np.float32,),
    "weight_shape": (np.int64, np.int32),
    "weight_zero_point": (np.int8,) if args.strategy == "tensor" else (np.int32,),
    "weight_g_idx": (np.int32, np.int64),
  }
  for field, expected in expected_shapes(args, shape).items():
    hf_quantized.check_tensor(f"{name}.{field}", t[field], expected, dtypes[field], described, source=source)
  if "weight_shape" in t and t["weight_shape"].tolist() != [n, k]:
    raise InputError(f"{prefix}{name}.weight_shape: expected [{n}, {k}] for {described}, got {t['weight_shape']}.")
  if "weight_g_idx" in t and ((t["weight_g_idx"] < 0).any() or (t["weight_g_idx"] >= k // args.group_size).any()):
    raise InputError(f"{prefix}{name}.weight_g_idx: values must lie in [0, {k // args.group_size}).")
  if mxfp4 and (t["weight_scale"] == 255).any():
    raise InputError(f"{prefix}{name}.weight_scale: E8M0 scale 255 is NaN in the format.")
  if nvfp4:
    if (np.asarray(t["weight_scale"]).view(np.uint8) & 0x7F == 0x7F).any():
      raise InputError(f"{prefix}{name}.weight_scale: an E4M3 scale is NaN.")
    global_scale = float(t["weight_global_scale"][0])
    if not valid_global_scale(global_scale):
      raise InputError(
        f"{prefix}{name}.weight_global_scale: expected a positive finite divisor above 1e-35, got {global_scale}."
      )
    return
  check_finite(f"{name}.weight_scale", t["weight_scale"], source or name)


def from_compressed(
  t: dict[str, np.ndarray], args: WeightArgs, shape: tuple[int, int], *, dtype=np.float32, name: str = "weight"
) -> QArray:
  """A `QArray` (shape (in, out), axis 0) from a layer's checked tensors (see `check_compressed_tensors`).

  A ``tensor`` strategy becomes one group per output channel holding the same scale (and zero point); an
  ``actorder: group`` layer becomes an act-order ``perm`` (the form of `qjax.formats.gptq.canonical_act_order`).
  """
  k, n = shape
  bits = args.num_bits
  scale = np.asarray(t["weight_scale"])
  if args.strategy == "tensor":
    scale = np.broadcast_to(scale.reshape(1, 1), (n, 1))
  one_scale = float(scale.reshape(-1)[0]) if args.strategy == "tensor" else None
  if args.kind == "float":
    if args.format == FLOAT_QUANTIZED:
      params = GroupParams(jnp.asarray(np.ascontiguousarray(scale.T)), None)
      codes = np.asarray(t["weight"]).view(np.uint8).T
      return _build_qarray(codes, params, spec=args.qspec(scale.dtype, one_scale), dtype=np.dtype(dtype))
    params = GroupParams(jnp.asarray(np.ascontiguousarray(scale.view(np.uint8).T)), None)
    packed = np.asarray(t["weight_packed"])
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, k).T
    global_scale = float(t["weight_global_scale"][0]) if "weight_global_scale" in t else None
    return _build_qarray(codes, params, spec=args.qspec(None, global_scale), dtype=np.dtype(dtype))
  offset = 1 << (bits - 1)
  if args.strategy == "tensor":
    zero = None if args.symmetric else np.full((1, n), int(t["weight_zero_point"][0]) + offset, np.int32)
  else:
    zero = None if args.symmetric else unpack_rows(t["weight_zero_point"].T, bits, n).astype(np.int32)
  spec = args.qspec(scale.dtype, one_scale)
  codes = unpack_rows(t["weight_packed"], bits, k).T
  perm = None
  if "weight_g_idx" in t:
    perm = gptq.perm_from_group_index(t["weight_g_idx"].astype(np.int32), spec, name)
    codes = codes if perm is None else codes[perm]
  params = GroupParams(jnp.asarray(np.ascontiguousarray(scale.T)), None if zero is None else jnp.asarray(zero))
  return _build_qarray(codes, params, spec=spec, perm=perm, dtype=np.dtype(dtype))


def _build_qarray(codes, params, *, spec: QSpec, perm=None, dtype) -> QArray:
  """`gptq.build_qarray`, compiled once per layout rather than once per per-tensor scale: the packing does not
  depend on the grid, so a grid with a per-tensor parameter is set after it."""
  if spec.grid is None or not isinstance(spec.grid, (NvFp4Grid, PerTensorGrid)):
    return gptq.build_qarray(codes, params, spec=spec, perm=perm, dtype=dtype)
  plain = dataclasses.replace(spec, grid=None, symmetric=True)
  q = gptq.build_qarray(codes, params, spec=plain, perm=perm, dtype=dtype)
  return dataclasses.replace(q, spec=spec)


# ---- the quantization_config ----


def quantization_config(args_by_module: dict[str, WeightArgs], dense_linears: list[str]) -> dict[str, Any]:
  """The ``quantization_config`` block: one scheme for every quantized linear (``targets: ["Linear"]``, the dense
  ones in ``ignore``) or, for mixed settings, one scheme per setting naming its modules."""
  schemes: dict[WeightArgs, list[str]] = {}
  for module, args in args_by_module.items():
    schemes.setdefault(args, []).append(module)
  one = len(schemes) == 1
  groups = {
    f"group_{i}": {
      "targets": ["Linear"] if one else sorted(modules),
      "weights": args.as_json(),
      "input_activations": None,
      "output_activations": None,
      "format": args.format,
    }
    for i, (args, modules) in enumerate(schemes.items())
  }
  formats = {args.format for args in schemes}
  return {
    "quant_method": QUANT_METHOD,
    "format": formats.pop() if len(formats) == 1 else "mixed-precision",
    "quantization_status": "compressed",
    "config_groups": groups,
    "ignore": sorted(dense_linears) if one else [],
    "kv_cache_scheme": None,
    "sparsity_config": {},
    "transform_config": {},
    "global_compression_ratio": None,
  }


def _bool(value, what: str, source: str) -> bool:
  if not isinstance(value, bool):
    raise InputError(f"{source}: {what} must be true or false, got {show(value)}.")
  return value


def parse_weight_args(weights: Any, source: str) -> WeightArgs:
  """A scheme's ``weights`` arguments, checked.

  Raises:
    InputError: naming `source` and what the format allows, for float or dynamic weights, bits qjax does not store,
      an unknown strategy, or a bad group size or actorder.
  """
  if not isinstance(weights, dict):
    raise InputError(f"{source}: weights expected a JSON object, got {show(weights)}.")
  kind = str(weights.get("type", "int")).lower()
  if kind not in ("int", "float"):
    raise InputError(f"{source}: weights of type {show(kind)} are not read; qjax reads int and float weights.")
  bits = weights.get("num_bits", 8)
  allowed = (4, 8) if kind == "float" else packing.SUPPORTED_BITS
  if type(bits) is not int or bits not in allowed:
    raise InputError(f"{source}: {kind} num_bits must be one of {allowed}, got {show(bits)}.")
  if weights.get("dynamic", False) is not False:
    raise InputError(f"{source}: dynamic weights (scales computed at run time) are not read, got {show(weights)}.")
  strategy = str(weights.get("strategy") or ("group" if weights.get("group_size") else "tensor")).lower()
  if strategy not in STRATEGIES:
    raise InputError(f"{source}: weight strategy must be one of {STRATEGIES}, got {show(strategy)}.")
  group_size = weights.get("group_size")
  if strategy in ("group", "tensor_group"):
    if type(group_size) is not int or not 0 < group_size < MAX_SIZE:
      raise InputError(f"{source}: {strategy} strategy needs a group_size in [1, 2**31), got {show(group_size)}.")
  else:
    group_size = None
  actorder = weights.get("actorder")
  if isinstance(actorder, str) or actorder is False:
    actorder = {"static": "weight", "dynamic": "group", False: None}.get(actorder, actorder)
  if actorder not in (None, "weight", "group"):
    raise InputError(f"{source}: actorder must be null, 'weight' or 'group', got {show(actorder)}.")
  if actorder == "group" and strategy != "group":
    actorder = None  # a g_idx over one group is the identity
  symmetric = _bool(weights.get("symmetric", True), "symmetric", source)
  if kind == "float" and not symmetric:
    raise InputError(f"{source}: float weights with a zero point are not read; FP8 and FP4 weights are symmetric.")
  if kind == "float" and bits == 4 and (strategy, group_size) not in (("group", 32), ("tensor_group", 16)):
    raise InputError(
      f"{source}: 4-bit float weights are read as MXFP4 (group strategy, group_size 32) or NVFP4 (tensor_group "
      f"strategy, group_size 16), got strategy {show(strategy)} group_size {show(group_size)}."
    )
  if strategy == "tensor_group" and (kind, bits) != ("float", 4):
    raise InputError(f"{source}: the tensor_group strategy is NVFP4's (4-bit float weights), got {kind} {bits}-bit.")
  return WeightArgs(bits, symmetric, strategy, group_size, actorder, kind)


class Schemes(NamedTuple):
  """The schemes of a ``quantization_config``: ``(targets, weight args)`` pairs, and the ignored modules."""

  groups: list[tuple[list[str], WeightArgs]]
  ignore: list[str]

  def args_for(self, module: str, source: str) -> WeightArgs:
    """The weight arguments of the linear `module` (the first scheme whose targets match it).

    Raises:
      InputError: if the module is stored quantized but no scheme targets it.
    """
    try:
      if not any(_matches(module, target) for target in self.ignore):
        for targets, args in self.groups:
          if any(_matches(module, target) for target in targets):
            return args
    except re.error as e:
      raise InputError(f"{source}: a 're:' target or ignore entry is not a regular expression ({e}).") from e
    raise InputError(f"{source}: {module} is stored quantized (weight_scale) but no config_groups scheme targets it.")


def _matches(module: str, target: str) -> bool:
  """compressed-tensors' rule for a linear module: ``re:`` a regular expression matched at the start of the name,
  ``Linear`` (or ``Module``) its classes, else the exact name."""
  if target.startswith("re:"):
    return re.match(target.removeprefix("re:"), module) is not None
  return target in ("Linear", "Module") or target == module


def _strings(value, what: str, source: str) -> list[str]:
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise InputError(f"{source}: {what} expected a list of strings, got {show(value)}.")
  return value


def parse_schemes(qc: dict[str, Any], source: str) -> Schemes:
  """The weight schemes of a compressed-tensors ``quantization_config``.

  Raises:
    InputError: naming `source` for a format other than ``pack-quantized``, a status other than ``compressed``,
      sparsity, transforms, activation or KV-cache quantization (qjax runs weight-only models), or bad schemes.
  """
  status = qc.get("quantization_status", "compressed")
  if status != "compressed":
    raise InputError(f"{source}: quantization_status {show(status)} is not read; qjax reads compressed checkpoints.")
  for key, what in (("sparsity_config", "sparsity"), ("transform_config", "transforms (online rotations)")):
    if qc.get(key):
      raise InputError(f"{source}: {what} ({key}) are not supported; qjax reads weight-only quantized checkpoints.")
  if qc.get("kv_cache_scheme"):
    raise InputError(f"{source}: a kv_cache_scheme is not supported; qjax reads weight-only quantized checkpoints.")
  config_groups = qc.get("config_groups")
  if not isinstance(config_groups, dict) or not config_groups:
    raise InputError(f"{source}: config_groups expected a non-empty JSON object, got {show(config_groups)}.")
  groups = []
  for group_name, scheme in config_groups.items():
    where = f"{source}: config_groups.{group_name}"
    if not isinstance(scheme, dict):
      raise InputError(f"{where} expected a JSON object, got {show(scheme)}.")
    fmt = scheme.get("format") or qc.get("format")
    if fmt not in FORMATS:
      raise InputError(
        f"{where}: format {show(fmt)} is not read; qjax reads {PACK_QUANTIZED!r} (integer weights), "
        f"{FLOAT_QUANTIZED!r} (FP8 weights), {MXFP4_PACK_QUANTIZED!r} and {NVFP4_PACK_QUANTIZED!r}."
      )
    for acts in ("input_activations", "output_activations"):
      if scheme.get(acts):
        raise InputError(f"{where}: {acts} are quantized; qjax runs weight-only schemes (e.g. W4A16, W8A16).")
    targets = _strings(scheme.get("targets"), f"config_groups.{group_name}.targets", source)
    args = parse_weight_args(scheme.get("weights"), where)
    if args.format != fmt:
      raise InputError(f"{where}: format {fmt!r} does not hold {args.kind} weights ({args.format!r} does).")
    groups.append((targets, args))
  return Schemes(groups, _strings(qc.get("ignore") or [], "ignore", source))


# ---- compressed-tensors directories ----


def save_compressed_tensors(
  out_dir: str,
  config: LlamaConfig,
  params,
  tokenizer,
  *,
  actorder: str | None = None,
  max_shard_bytes: int = hf_quantized.MAX_SHARD_BYTES,
  overwrite: bool = False,
) -> None:
  """Writes quantized params as a compressed-tensors directory that vLLM and transformers load: ``pack-quantized``
  integer weights, ``float-quantized`` FP8 ones, ``mxfp4-pack-quantized`` MXFP4 and ``nvfp4-pack-quantized`` NVFP4
  ones.

  Every quantized leaf must be a ``packed`` Dense kernel of a decoder linear or ``lm_head`` (affine, `Fp8Grid`,
  `MxFp4Grid` or `NvFp4Grid`), without an act-order permutation, with a group size dividing its input width;
  linears may differ in settings (one scheme each). NVFP4 linears that vLLM runs as one matrix (q/k/v, gate/up)
  must share their global scale (`qjax.transforms.per_leaf` fixes it so). Everything else is written in float16.

  Args:
    out_dir: the directory to create (written beside it and renamed when complete; see `qjax.formats.output`).
    config: the model config.
    params: the Flax parameter tree.
    tokenizer: a `transformers` tokenizer, or None.
    actorder: ``"weight"`` to record that GPTQ ran in activation order with groups kept in input order (metadata:
      the tensors are the same), or None.
    max_shard_bytes: largest safetensors file before sharding.
    overwrite: replace a previous qjax output of another kind.

  Raises:
    ValueError: for params the format cannot hold (see `to_compressed`).
    InputError: if `out_dir` may not be written.
  """
  with atomic_directory(out_dir, QUANT_METHOD, overwrite=overwrite) as tmp:
    write_compressed_tensors(tmp, config, params, tokenizer, actorder=actorder, max_shard_bytes=max_shard_bytes)


def write_compressed_tensors(
  directory: str,
  config: LlamaConfig,
  params,
  tokenizer,
  *,
  actorder: str | None = None,
  max_shard_bytes: int = hf_quantized.MAX_SHARD_BYTES,
) -> None:
  """`save_compressed_tensors`'s files, written into the existing `directory`; `params` may be a stream of parts."""
  if actorder not in (None, "weight"):
    raise ValueError(f"`write_compressed_tensors` expected actorder None or 'weight', got {actorder!r}.")
  args_by_module = {}  # under the names the tensors are written with (a family's fused projections, each expert)

  def module_tensors(module: str, q: QArray) -> dict[str, np.ndarray]:
    args_by_module[module] = weight_args(q.spec, actorder=actorder)
    return to_compressed(q, name=module)

  written, config = hf_quantized.write_weights(
    directory, config, params, module_tensors, max_shard_bytes=max_shard_bytes, check=check_fused_global_scales
  )
  hf_quantized.quantized_linears(written, "compressed-tensors")
  # Under the names transformers' modules have: each expert its own Linear, a router a Linear kept dense.
  dense_linears = [hf_quantized.hf_tensor_name(path).removesuffix(".weight")
                   for path, leaf in leaves_with_paths(split_experts(written, config))
                   if HF_LINEAR.fullmatch(path) and not is_qarray(leaf)]  # fmt: skip
  if config.tie_word_embeddings:
    dense_linears.append("lm_head")  # the tied head is a Linear in transformers; it stays the embedding
  qc = quantization_config(args_by_module, dense_linears)
  hf_quantized.write_hf_directory(directory, config, qc, tokenizer)


HF_LINEAR = re.compile(r"model/layers_\d+/(self_attn|mlp|block_sparse_moe)/(experts/\d+/)?\w+/kernel|lm_head/kernel")

# Linears vLLM loads into one matrix (QKVParallelLinear, MergedColumnParallelLinear): it keeps one NVFP4 global
# scale for all of them (the largest), so they must be written with the same one.
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def check_fused_global_scales(tensors: dict[str, np.ndarray]) -> None:
  """Raises naming the modules when linears vLLM fuses (`VLLM_FUSED`) have different NVFP4 global scales."""
  scales: dict[tuple[str, int], dict[str, float]] = {}
  for name, value in tensors.items():
    module, _, field = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    fused = next((i for i, members in enumerate(VLLM_FUSED) if leaf in members), None)
    if field == "weight_global_scale" and fused is not None:
      scales.setdefault((parent, fused), {})[module] = float(value[0])
  for by_module in scales.values():
    if len(set(by_module.values())) > 1:
      raise ValueError(
        f"NVFP4 linears that vLLM runs as one matrix have different global scales: {by_module}; vLLM keeps one for "
        "all of them and would decode the others wrongly. Quantize them through one transform (`qjax.transforms.rtn`"
        "/`gptq` fix one scale per fused set), or give each spec NvFp4Grid(global_scale=...) for the set."
      )


def load_compressed_tensors(model_dir: str, *, dtype=np.float32) -> tuple[LlamaConfig, dict]:
  """Reads a compressed-tensors directory (qjax's, llm-compressor's; ``pack-quantized``, ``float-quantized`` FP8,
  MXFP4 or NVFP4 weights) into qjax params.

  Args:
    model_dir: a Hugging Face directory whose ``quantization_config`` says ``compressed-tensors``.
    dtype: dtype of the dense leaves and of what the QArrays dequantize to.

  Returns:
    ``(config, params)``: linears stored with a ``weight_scale`` as `QArray` (see `from_compressed`), the rest
    dense.

  Raises:
    FileNotFoundError: naming a missing config or weights file.
    InputError: naming the file, scheme or tensor for what qjax does not read (see `parse_schemes`), tensors that
      do not match their scheme, NaN or Inf scales or weights, or a truncated file.
  """
  config = LlamaConfig.from_pretrained(model_dir)
  qc = hf_quantized.read_quantization_config(model_dir)
  source = os.path.join(model_dir, "config.json")
  if qc is None:
    raise InputError(f"{source}: no quantization_config.")
  schemes = parse_schemes(qc, source)
  tensors = hf_quantized.HfTensors(model_dir)

  def quantized(module: str, shape: tuple[int, int]) -> QArray:
    args = schemes.args_for(module, source)
    names = {field: f"{module}.{field}" for field in expected_shapes(args, shape)}
    missing = [name for name in names.values() if name not in tensors]
    if missing:
      raise InputError(f"{model_dir}: {missing[0]} is missing for {module}'s {args.strategy} scheme.")
    got = tensors.get_many(list(names.values()))
    t = {field: got[name] for field, name in names.items()}
    check_compressed_tensors(t, args, shape, module, source=model_dir)
    return from_compressed(t, args, shape, dtype=dtype, name=f"{model_dir}: {module}")

  params = hf_quantized.read_hf_params(tensors, config, quantized, dtype=dtype, packed_suffix=MARKER)
  return config, params
