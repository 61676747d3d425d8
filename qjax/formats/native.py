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
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qjax.atomic import atomic_directory
from qjax.core import QArray, QSpec, is_qarray
from qjax.models.config import LlamaConfig
from qjax.transforms.base import leaves_with_paths

MANIFEST = "qjax_quantization.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
_QARRAY_FIELDS = ("codes", "scale", "zero", "perm")


def is_qjax_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MANIFEST))


def _spec_to_json(spec: QSpec) -> dict:
  d = dataclasses.asdict(spec)
  d["scale_dtype"] = str(spec.scale_dtype)
  return d


def _set_path(tree: dict, path: str, value) -> None:
  *parents, last = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value


def flatten_params(params) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A parameter tree as flat named arrays plus a JSON manifest describing its `QArray` leaves."""
  tensors, quantized = {}, {}
  for path, leaf in leaves_with_paths(params):
    if is_qarray(leaf):
      quantized[path] = {"spec": _spec_to_json(leaf.spec), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                         "axis": leaf.axis}  # fmt: skip
      for field in _QARRAY_FIELDS:
        value = getattr(leaf, field)
        if value is not None:
          tensors[f"{path}:{field}"] = np.asarray(value)
    else:
      tensors[path] = np.asarray(leaf)
  return tensors, {"format_version": FORMAT_VERSION, "quantized": quantized}


def unflatten_params(tensors: dict[str, np.ndarray], manifest: dict[str, Any], *, source: str) -> dict:
  """Inverse of `flatten_params`.

  Raises:
    ValueError: naming `source` when a quantized leaf has no codes.
  """
  params: dict = {}
  for path, info in manifest["quantized"].items():
    fields = {k: tensors.get(f"{path}:{k}") for k in _QARRAY_FIELDS}
    if fields["codes"] is None:
      raise ValueError(f"{source}: quantized tensor {path!r} has no codes.")
    spec = QSpec(**{**info["spec"], "scale_dtype": np.dtype(info["spec"]["scale_dtype"])})
    leaf = QArray(
      **{k: None if v is None else jax.numpy.asarray(v) for k, v in fields.items()},
      spec=spec,
      shape=tuple(info["shape"]),
      dtype=np.dtype(info["dtype"]),
      axis=info["axis"],
    )
    _set_path(params, path, leaf)
  for name, value in tensors.items():
    if ":" not in name:
      _set_path(params, name, value)
  return params


def save_quantized(
  out_dir: str, config: LlamaConfig, params, tokenizer, *, metadata: dict[str, Any] | None = None
) -> None:
  """Writes a quantized (or dense) parameter tree as a qjax directory.

  Args:
    out_dir: the directory to create; an existing one is replaced only once the new one is complete.
    config: the model config.
    params: the Flax parameter tree with dense and `QArray` leaves.
    tokenizer: a `transformers` tokenizer, saved beside the weights.
    metadata: JSON-serialisable facts recorded under ``config.json["qjax"]`` (source model, method, flags).
  """
  tensors, manifest = flatten_params(params)
  with atomic_directory(out_dir) as tmp:
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "qjax"})
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({**config.to_hf_dict(), "qjax": metadata or {}}, f, indent=2)
    tokenizer.save_pretrained(tmp)


def load_quantized(model_dir: str):
  """Reads a qjax directory: ``(config, params, metadata)``; the tokenizer loads like any HF directory.

  Raises:
    ValueError: naming the file when the manifest and the weights disagree or a file is unreadable.
  """
  manifest_path = os.path.join(model_dir, MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{manifest_path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}.")
  config = LlamaConfig.from_pretrained(model_dir)
  with open(os.path.join(model_dir, "config.json")) as f:
    metadata = json.load(f).get("qjax", {})
  weights = os.path.join(model_dir, WEIGHTS)
  try:
    with safe_open(weights, "numpy") as f:
      tensors = {name: f.get_tensor(name) for name in f.keys()}
  except SafetensorError as e:
    raise ValueError(f"{weights}: unreadable safetensors file ({e}); is it truncated?") from e
  return config, unflatten_params(tensors, manifest, source=weights), metadata
