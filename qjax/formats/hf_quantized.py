"""Hugging Face directories of quantized Llama-family models, shared by the GPTQ and AWQ formats.

Tensor names, float16 conversion of everything not quantized, sharded safetensors (metadata
``{"format": "pt"}``) written to a temporary directory and renamed when complete, the
``quantization_config`` reader, and a reader that checks every tensor against the model config.
"""

import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qjax.atomic import atomic_directory
from qjax.core import QArray, QSpec, is_qarray
from qjax.models.checkpoint import hf_layer_tensors
from qjax.models.config import LlamaConfig
from qjax.transforms.base import leaves_with_paths

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LINEAR_KERNEL = re.compile(r"model/layers_\d+/(self_attn|mlp)/\w+_proj/kernel|lm_head/kernel")
LAYER_LINEAR = re.compile(r"model/layers_\d+/(self_attn|mlp)/\w+_proj/kernel")


def hf_tensor_name(path: str) -> str:
  """Hugging Face name of a Flax leaf: ``model/layers_3/mlp/up_proj/kernel`` -> ``model.layers.3.mlp.up_proj.weight``.

  Raises:
    ValueError: for a leaf kind with no Hugging Face counterpart.
  """
  *modules, leaf = path.split("/")
  suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}.get(leaf)
  if suffix is None or not modules:
    raise ValueError(f"parameter {path!r} has no Hugging Face tensor name.")
  return ".".join([re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules] + [suffix])


def model_spec(params, fmt: str) -> QSpec:
  """The one spec of every quantized linear of `params`, checking what a GPTQ/AWQ config can describe.

  Raises:
    ValueError: naming the leaves, when nothing is quantized, a non-linear leaf is quantized, a decoder
      linear is left dense, or the quantized linears use different bits, group sizes or symmetry.
  """
  leaves = leaves_with_paths(params)
  quantized = {path: leaf for path, leaf in leaves if is_qarray(leaf)}
  if not quantized:
    raise ValueError(f"a {fmt} export needs quantized linears; these params have none (quantize them first).")
  not_linear = [p for p in quantized if not LINEAR_KERNEL.fullmatch(p)]
  dense = [p for p, leaf in leaves if LAYER_LINEAR.fullmatch(p) and not is_qarray(leaf)]
  if not_linear or dense:
    raise ValueError(
      f"a {fmt} checkpoint quantizes every decoder linear (and optionally lm_head) and nothing else; got "
      f"quantized {not_linear[:3]} and dense {dense[:3]}."
    )
  specs = {(q.spec.bits, q.spec.group_size, q.spec.symmetric): p for p, q in quantized.items()}
  if len(specs) > 1:
    found = ", ".join(f"{p}: bits={b} group_size={g} symmetric={s}" for (b, g, s), p in specs.items())
    raise ValueError(f"a {fmt} config has one bits/group_size/sym for all layers; got {found}.")
  return next(iter(quantized.values())).spec


def hf_tensors(params, quantized: Callable[[str, QArray], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Every leaf as Hugging Face tensors: dense leaves in float16 (kernels transposed to [out, in]).

  Args:
    params: the Flax parameter tree.
    quantized: ``(module name, QArray) -> {suffix: array}`` for quantized leaves.

  Raises:
    ValueError: naming the tensor when a dense value overflows float16.
  """
  tensors = {}
  for path, leaf in leaves_with_paths(params):
    name = hf_tensor_name(path)
    if is_qarray(leaf):
      module = name.removesuffix(".weight")
      tensors.update({f"{module}.{suffix}": value for suffix, value in quantized(module, leaf).items()})
      continue
    w = np.asarray(leaf, np.float32)
    half = (w.T if path.endswith("/kernel") else w).astype(np.float16)
    if not np.isfinite(half).all():
      raise ValueError(f"{name}: values beyond float16's range (max |x| = {np.abs(w).max():.4g}).")
    tensors[name] = np.ascontiguousarray(half)
  return tensors


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Tensors in name order (a module's tensors together), cut into shards of at most `max_shard_bytes`."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  return shards


def _save_weights(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
  shards = _shards(tensors, max_shard_bytes)
  if len(shards) == 1:
    save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, file))
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
  with open(os.path.join(directory, WEIGHTS_INDEX), "w") as f:
    json.dump(index, f, indent=2)


def write_hf_directory(
  out_dir: str,
  config: LlamaConfig,
  tensors: dict[str, np.ndarray],
  quantization_config: dict[str, Any],
  tokenizer,
  *,
  max_shard_bytes: int = MAX_SHARD_BYTES,
  extra_json: dict[str, dict] | None = None,
) -> None:
  """Writes a quantized Hugging Face directory: weights, ``config.json``, extra JSON files, the tokenizer.

  The directory is written beside `out_dir` and renamed when complete; an existing `out_dir` is replaced
  only then.

  Args:
    out_dir: the directory to create.
    config: the model config (written with ``torch_dtype: float16`` and `quantization_config`).
    tensors: Hugging Face name -> array.
    quantization_config: the ``config.json["quantization_config"]`` block.
    tokenizer: a `transformers` tokenizer, saved beside the weights (None: no tokenizer files).
    max_shard_bytes: largest safetensors file; more tensors go to ``model-0000i-of-0000n.safetensors``
      with ``model.safetensors.index.json``.
    extra_json: more files to write, name -> content (e.g. ``quantize_config.json``).
  """
  with atomic_directory(out_dir) as tmp:
    _save_weights(tmp, tensors, max_shard_bytes)
    hf = {**config.to_hf_dict(), "torch_dtype": "float16", "quantization_config": quantization_config}
    for file, content in {"config.json": hf, **(extra_json or {})}.items():
      with open(os.path.join(tmp, file), "w") as f:
        json.dump(content, f, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)


def read_quantization_config(model_dir: str) -> dict[str, Any] | None:
  """``config.json["quantization_config"]``, else the legacy ``quantize_config.json`` (AutoGPTQ), else None."""
  qc = _read_json(os.path.join(model_dir, "config.json")).get("quantization_config")
  legacy = os.path.join(model_dir, "quantize_config.json")
  if qc is None and os.path.exists(legacy):
    qc = {"quant_method": "gptq", **_read_json(legacy)}
  return qc


def _read_json(path: str) -> dict:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e


class HfTensors:
  """The tensors of a Hugging Face directory (one safetensors file or an index of shards), any dtype.

  Raises:
    FileNotFoundError: naming the missing weights or shard.
    ValueError: naming the file when it is unreadable or truncated.
  """

  def __init__(self, model_dir: str):
    self.source = model_dir
    index = os.path.join(model_dir, WEIGHTS_INDEX)
    if os.path.exists(index):
      with open(index) as f:
        self.files = {name: os.path.join(model_dir, file) for name, file in json.load(f)["weight_map"].items()}
    elif os.path.exists(os.path.join(model_dir, WEIGHTS)):
      single = os.path.join(model_dir, WEIGHTS)
      with self._open(single) as f:
        self.files = dict.fromkeys(f.keys(), single)
    else:
      raise FileNotFoundError(f"{model_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}.")
    missing = sorted({f for f in self.files.values() if not os.path.exists(f)})
    if missing:
      raise FileNotFoundError(f"{index}: names missing weight files {missing}.")
    self.read: set[str] = set()

  @staticmethod
  def _open(file: str):
    try:
      return safe_open(file, "flax")  # the flax framework reads bfloat16, which numpy cannot
    except SafetensorError as e:
      raise ValueError(f"{file}: unreadable safetensors file ({e}); is it truncated?") from e

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def get_many(self, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors by name, as stored (numpy; bfloat16 as ml_dtypes' bfloat16)."""
    missing = [n for n in names if n not in self.files]
    if missing:
      raise ValueError(f"{self.source}: tensors {missing} are missing from the checkpoint.")
    by_file: dict[str, list[str]] = {}
    for name in names:
      by_file.setdefault(self.files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
      with self._open(file) as f:
        for name in file_names:
          out[name] = np.asarray(f.get_tensor(name))
    self.read.update(names)
    return out

  def check_all_read(self) -> None:
    """Raises if the checkpoint holds tensors the config does not describe (they would be silently dropped)."""
    unread = sorted(n for n in set(self.files) - self.read if not n.endswith("rotary_emb.inv_freq"))
    if unread:
      raise ValueError(
        f"{self.source}: tensors the config does not describe: {unread[:5]}{' …' if len(unread) > 5 else ''}."
      )


def linear_shape(config: LlamaConfig, module: str) -> tuple[int, int]:
  """(in, out) of a linear module such as ``model.layers.0.self_attn.k_proj`` or ``lm_head``."""
  q_width, kv_width = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  hidden, inter = config.hidden_size, config.intermediate_size
  shapes = {
    "q_proj": (hidden, q_width),
    "k_proj": (hidden, kv_width),
    "v_proj": (hidden, kv_width),
    "o_proj": (q_width, hidden),
    "gate_proj": (hidden, inter),
    "up_proj": (hidden, inter),
    "down_proj": (inter, hidden),
    "lm_head": (hidden, config.vocab_size),
  }
  return shapes[module.rsplit(".", maxsplit=1)[-1]]


def check_tensor(name: str, value: np.ndarray, shape: tuple[int, ...], dtypes: tuple, described: str) -> None:
  """Raises naming the tensor when its shape or dtype is not what the config implies."""
  if tuple(value.shape) != tuple(shape) or np.dtype(value.dtype) not in [np.dtype(d) for d in dtypes]:
    allowed = "/".join(str(np.dtype(d)) for d in dtypes)
    raise ValueError(
      f"{name}: expected shape {tuple(shape)} {allowed} for {described}, got {tuple(value.shape)} {value.dtype}; "
      "the checkpoint's config does not describe its tensors."
    )


def read_hf_params(
  tensors: HfTensors,
  config: LlamaConfig,
  quantized: Callable[[str, tuple[int, int]], QArray],
  *,
  dtype=np.float32,
) -> dict:
  """The Flax parameter tree of a quantized Hugging Face directory.

  Args:
    tensors: the directory's tensors.
    config: the model config.
    quantized: ``(module name, (in, out)) -> QArray`` for linears stored with a ``qweight``.
    dtype: dtype of the dense leaves.

  Raises:
    ValueError: for missing tensors, or tensors the config does not describe.
  """

  def dense(name: str, transpose: bool) -> np.ndarray:
    w = tensors.get_many([name])[name].astype(dtype)
    return np.ascontiguousarray(w.T) if transpose else w

  def leaf(name: str, transpose: bool):
    module = name.removesuffix(".weight")
    if transpose and f"{module}.qweight" in tensors:
      return quantized(module, linear_shape(config, module))
    return dense(name, transpose)

  model: dict = {"embed_tokens": {"embedding": dense("model.embed_tokens.weight", False)}}
  for i in range(config.num_hidden_layers):
    layer: dict = {}
    for name, (path, transpose) in hf_layer_tensors(config, i).items():
      node = layer
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = leaf(name, transpose)
    model[f"layers_{i}"] = layer
  model["norm"] = {"scale": dense("model.norm.weight", False)}
  params = {"model": model}
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": leaf("lm_head.weight", True)}
  tensors.check_all_read()
  return params
