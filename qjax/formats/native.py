"""qjax's own quantized-model directory: what `qjax quantize --out=DIR` writes and `--model=DIR` reads.

Layout::

  DIR/config.json              Hugging Face config of the model (plus a "qjax" block: source model, method)
  DIR/model.safetensors        every leaf by Flax path; a QArray leaf as PATH:codes, PATH:scale, PATH:zero, PATH:perm
  DIR/qjax_quantization.json   per QArray leaf: spec, logical shape, dtype, contraction axis
  DIR/tokenizer*               the tokenizer files

The directory is complete or absent: it is written beside its final name and renamed.
"""

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np

from qjax.core import ggml, packing
from qjax.core.errors import InputError
from qjax.core.files import one_line
from qjax.core.qspec import PACKED, QSpec
from qjax.core.tree import (
  FORMAT_VERSION,
  QARRAY_FIELDS,
  flatten_params,
  grid_name,
  spec_from_json,
  unflatten_params,
)
from qjax.formats import shards
from qjax.formats.output import atomic_directory
from qjax.models.checkpoint import (
  TensorInfo,
  check_finite,
  check_group_length,
  check_layer_count,
  check_shape,
  model_file,
  param_shapes,
  read_safetensors,
  safetensors_header,
)
from qjax.models.config import MAX_SIZE, LlamaConfig, read_json, show

MANIFEST = "qjax_quantization.json"
WEIGHTS = "model.safetensors"
FLAX_LAYER = re.compile(r"model/layers_(\d+)/")
# numpy dtype name -> safetensors dtype name, for the dtypes a QArray's tensors are stored in.
STORED_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "uint32": "U32", "int32": "I32", "uint8": "U8"}
SPEC_TYPES = {"bits": int, "group_size": int, "symmetric": bool, "scale_dtype": str, "layout": str,
              "partial_groups": bool, "grid": str, "global_scale": float, "tensor_scale": float}  # fmt: skip


def is_qjax_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MANIFEST))


def save_quantized(
  out_dir: str,
  config: LlamaConfig,
  params,
  tokenizer,
  *,
  metadata: dict[str, Any] | None = None,
  overwrite: bool = False,
) -> None:
  """Writes a quantized (or dense) parameter tree as a qjax directory, complete or not at all.

  Args:
    out_dir: the directory to create (see `qjax.formats.output`: a previous qjax directory is replaced only once
      the new one is complete; a directory of other files is refused).
    config: the model config.
    params: the Flax parameter tree with dense and `QArray` leaves.
    tokenizer: a `transformers` tokenizer, saved beside the weights.
    metadata: JSON-serialisable facts recorded under ``config.json["qjax"]`` (source model, method, flags).
    overwrite: replace a previous qjax output of another kind.
  """
  with atomic_directory(out_dir, "qjax", overwrite=overwrite) as tmp:
    write_quantized(tmp, config, params, tokenizer, metadata=metadata)


def write_quantized(directory: str, config: LlamaConfig, params, tokenizer, *, metadata=None) -> None:
  """Writes a qjax directory's files into the existing `directory` (`save_quantized` makes it atomic); `params` may
  be a stream of parts (full-path subtrees), written one at a time."""
  weights = shards.SafetensorsWriter(directory, max_shard_bytes=2**63, metadata={"format": "qjax"})
  manifest, untied = {}, False
  try:
    for part in shards.as_parts(params):
      tensors, part_manifest = flatten_params(part)
      for name in list(tensors):
        weights.add(name, tensors.pop(name))
      manifest = {**part_manifest, "quantized": {**manifest.get("quantized", {}), **part_manifest["quantized"]}}
      untied = untied or "lm_head" in part
      del part, tensors
  except BaseException:
    weights.spill.close()
    raise
  weights.close()
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  config = dataclasses.replace(config, tie_word_embeddings=not untied)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({**config.to_hf_dict(), "qjax": metadata or {}}, f, indent=2)
  tokenizer.save_pretrained(directory)


def load_quantized(model_dir: str):
  """Reads a qjax directory: ``(config, params, metadata)``; the tokenizer loads like any HF directory.

  Everything is checked before the weights are read: the manifest's entries (spec, shape, dtype, axis), each
  quantized leaf's tensors against its entry (shapes and dtypes its spec implies), and every leaf against the
  config's parameter shapes. Then scales and dense weights must be finite, and each ``perm`` a permutation.

  Raises:
    FileNotFoundError: naming a missing manifest, config or weights file.
    InputError: naming the file (and tensor or manifest entry) when the manifest, the config and the weights
      disagree, or a file is unreadable.
  """
  manifest_path = os.path.join(model_dir, MANIFEST)
  manifest = read_json(manifest_path)
  version = manifest.get("format_version") if isinstance(manifest, dict) else None
  if type(version) is not int or version != FORMAT_VERSION:
    raise InputError(f"{manifest_path}: format_version expected {FORMAT_VERSION}, got {show(version)}.")
  entries = manifest.get("quantized")
  if not isinstance(entries, dict):
    raise InputError(f"{manifest_path}: quantized expected an object of leaf path -> entry, got {show(entries)}.")
  config = LlamaConfig.from_pretrained(model_dir)
  config_path = os.path.join(model_dir, "config.json")
  metadata = read_json(config_path).get("qjax", {})
  if not isinstance(metadata, dict):
    raise InputError(f"{config_path}: qjax expected an object, got {show(metadata)}.")
  weights = model_file(model_dir, WEIGHTS, model_dir)
  info = safetensors_header(weights)
  leaves = {path: _leaf_entry(path, entry, manifest_path) for path, entry in entries.items()}
  _check_against_config(info, leaves, config, config_path, weights)
  for path, (spec, shape, _, axis) in leaves.items():
    _check_qarray_tensors(path, spec, shape, axis, info, weights, manifest_path)
  tensors = read_safetensors(weights, list(info))
  _check_values(tensors, leaves, weights)
  return config, unflatten_params(tensors, manifest, source=weights), metadata


def _leaf_entry(path: str, entry: Any, manifest_path: str) -> tuple[QSpec, tuple[int, int], str, int]:
  """``(spec, shape, dtype, axis)`` of a manifest entry, every field checked (a QSpec error names the entry).

  Raises:
    InputError: naming the manifest and the entry.
  """
  where = f"{manifest_path}: entry {show(path)}"
  if not isinstance(entry, dict) or set(entry) != {"spec", "shape", "dtype", "axis"}:
    raise InputError(f"{where} expected an object with spec, shape, dtype and axis, got {show(entry)}.")
  spec, shape, dtype, axis = entry["spec"], entry["shape"], entry["dtype"], entry["axis"]
  if not isinstance(spec, dict) or not set(spec) <= set(SPEC_TYPES) or "scale_dtype" not in spec:
    raise InputError(f"{where}: spec expected an object with keys among {sorted(SPEC_TYPES)}, got {show(spec)}.")
  wrong = next((k for k, v in spec.items() if type(v) is not SPEC_TYPES[k]), None)
  if wrong is not None:
    raise InputError(f"{where}: spec.{wrong} expected {SPEC_TYPES[wrong].__name__}, got {show(spec[wrong])}.")
  try:
    spec = spec_from_json(spec)
  except (TypeError, ValueError) as e:
    raise InputError(f"{where}: {one_line(e)}") from e
  if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and 0 < d < MAX_SIZE for d in shape)):
    raise InputError(f"{where}: shape expected two integers in [1, 2**31), got {show(shape)}.")
  if dtype not in ("float32", "bfloat16", "float16"):
    raise InputError(f"{where}: dtype expected float32, bfloat16 or float16, got {show(dtype)}.")
  if type(axis) is not int or axis not in (0, 1):
    raise InputError(f"{where}: axis expected 0 or 1, got {show(axis)}.")
  return spec, (shape[0], shape[1]), dtype, axis


def _qarray_tensors(spec: QSpec, shape: tuple[int, int], axis: int) -> dict[str, TensorInfo | None]:
  """The stored tensors a QArray of `spec`, `shape` and `axis` has: field -> `TensorInfo` (None: absent).

  ``perm`` is listed with the shape it has when present (it is optional).

  Raises:
    ValueError: when no QArray of `spec` has this shape (the packed axis or the blocks do not fit).
  """
  k, n = shape if axis == 0 else shape[::-1]
  perm = TensorInfo((k,), "I32")
  if spec.is_ggml:
    block = ggml.BLOCK_TYPES[spec.layout]
    if k % block.block_size:
      raise ValueError(f"the contraction length {k} is not a whole number of {spec.layout} blocks")
    codes = TensorInfo((n, k // block.block_size * block.type_size), "U8")
    return {"codes": codes, "scale": None, "zero": None, "perm": None}
  if spec.layout != PACKED:
    raise ValueError(f"layout {spec.layout} is not stored in a qjax directory")
  spec.check_divides("load_quantized", k, shape)
  check_group_length(spec.group_size, k, "the spec")
  period = packing.codes_per_period(spec.bits)
  if k % period:
    raise ValueError(f"the contraction length {k} is not a multiple of {period}, as {spec.bits}-bit packing needs")
  groups = (spec.num_groups(k), n)
  scale_dtype = "uint8" if grid_name(spec) in ("mxfp4", "nvfp4") else str(spec.scale_dtype)  # E8M0/E4M3 bytes
  return {
    "codes": TensorInfo((packing.packed_length(k, spec.bits), n), "U32"),
    "scale": TensorInfo(groups, STORED_DTYPES[scale_dtype]),
    "zero": None if spec.symmetric else TensorInfo(groups, "I32"),
    "perm": perm,
  }


def _check_qarray_tensors(path, spec, shape, axis, info: dict[str, TensorInfo], weights, manifest_path) -> None:
  """Raises naming the tensor when a quantized leaf's stored tensors are not the ones its manifest entry implies."""
  try:
    expected = _qarray_tensors(spec, shape, axis)
  except ValueError as e:
    raise InputError(f"{manifest_path}: entry {show(path)}: {one_line(e)}.") from e
  for field, want in expected.items():
    name = f"{path}:{field}"
    got = info.get(name)
    if want is None and got is not None:
      raise InputError(f"{weights}: tensor {name} is not part of a {spec.layout} QArray ({manifest_path}).")
    if want is not None and got is None and field != "perm":
      raise InputError(f"{weights}: tensor {name} is missing (expected by {manifest_path}).")
    if want is not None and got is not None and got != want:
      raise InputError(
        f"{weights}: tensor {name} expected shape {want.shape} {want.dtype} from {manifest_path} (spec bits="
        f"{spec.bits} group_size={spec.group_size} layout={spec.layout}, shape {shape}, axis {axis}), got "
        f"{got.shape} {got.dtype}."
      )


def _check_against_config(info: dict[str, TensorInfo], leaves: dict, config, config_path: str, weights: str) -> None:
  """Raises naming the tensor or leaf unless the dense tensors and quantized leaves are exactly the config's
  parameters, each of its shape (dense ones of a float dtype)."""
  dense = {name for name in info if ":" not in name}
  check_layer_count(dense | set(leaves), config, layer=FLAX_LAYER, config_path=config_path, source=weights)
  expected = param_shapes(config)
  parts = [name.rpartition(":") for name in info if ":" in name]
  stray = sorted(f"{path}:{field}" for path, _, field in parts if path not in leaves or field not in QARRAY_FIELDS)
  extra = sorted((dense | set(leaves)) - set(expected)) + stray
  if extra:
    raise InputError(f"{weights}: tensors the config does not describe: {extra[:5]} (from {config_path}).")
  both = sorted(dense & set(leaves))
  missing = sorted(set(expected) - dense - set(leaves))
  if both or missing:
    what = f"stored both dense and quantized: {both[:5]}" if both else f"missing: {missing[:5]}"
    raise InputError(f"{weights}: tensors {what} (expected by {config_path}).")
  for name in sorted(dense):
    check_shape(name, info[name], expected[name], config_path=config_path, source=weights)
  for path, (_, shape, _, _) in leaves.items():
    if shape != expected[path]:
      raise InputError(f"{weights}: quantized {path} expected shape {expected[path]} from {config_path}, got {shape}.")


def _check_values(tensors: dict[str, np.ndarray], leaves: dict, weights: str) -> None:
  """Raises naming the tensor when a dense weight or a scale holds NaN or Inf, or a ``perm`` is no permutation."""
  for name, value in tensors.items():
    if name.endswith(":scale") and value.dtype == np.uint8:  # MXFP4's E8M0 or NVFP4's E4M3 scale bytes
      nan = value == 255 if grid_name(leaves[name.rpartition(":")[0]][0]) == "mxfp4" else value & 0x7F == 0x7F
      if nan.any():
        raise InputError(f"{weights}: tensor {name} holds NaN scale codes.")
    elif ":" not in name or name.endswith(":scale"):
      check_finite(name, value, weights)
    elif name.endswith(":perm") and not np.array_equal(np.sort(value), np.arange(len(value))):
      raise InputError(f"{weights}: tensor {name} expected a permutation of 0..{len(value) - 1}.")
