"""Hugging Face directories of quantized Llama-family models, shared by the GPTQ and AWQ formats.

Tensor names, float16 conversion of everything not quantized, sharded safetensors (metadata
``{"format": "pt"}``) written to a temporary directory and renamed when complete, the
``quantization_config`` reader, and a reader that checks every tensor against the model config.
"""

import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from qjax.core import QArray, QSpec, is_qarray
from qjax.core.errors import InputError
from qjax.core.tree import leaves_with_paths
from qjax.formats import shards
from qjax.models.checkpoint import (
  HF_LAYER,
  TensorFiles,
  check_finite,
  check_layer_count,
  expert_shapes,
  hf_expert_tensors,
  hf_layer_tensors,
  hf_tensor_shapes,
  linear_shapes,
  norm_offset,
  split_experts,
  stack_experts,
)
from qjax.models.config import LlamaConfig, read_json, show
from qjax.models.fused import fuse_params, split_layer

Params = Any

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"
LINEAR_KERNEL = re.compile(r"model/layers_\d+/(self_attn|mlp|mlp/experts)/\w+_proj/kernel|lm_head/kernel")
LAYER_LINEAR = re.compile(r"model/layers_\d+/(self_attn|mlp|mlp/experts)/\w+_proj/kernel")


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


def quantized_linears(params, fmt: str) -> dict[str, QArray]:
  """The quantized leaves of `params` by path, checking that a Hugging Face quantized checkpoint can hold them.

  Raises:
    ValueError: naming the leaves, when nothing is quantized, a non-linear leaf is quantized, or a decoder
      linear is left dense.
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
  return quantized


def model_spec(params, fmt: str, *, widths: bool = False) -> QSpec:
  """The one spec of every quantized linear of `params`, checking what a GPTQ/AWQ config can describe.

  Args:
    params: the parameter tree.
    fmt: the format's name, for messages.
    widths: the config can give modules their own bit widths and group sizes (GPTQ's ``dynamic``): the spec
      returned is the one most linears take, and only symmetry must agree.

  Raises:
    ValueError: naming the leaves, as `quantized_linears` does, or when the quantized linears use different bits,
      group sizes or symmetry.
  """
  quantized = quantized_linears(params, fmt)
  layout = lambda q: (None, None, q.spec.symmetric) if widths else (q.spec.bits, q.spec.group_size, q.spec.symmetric)
  specs = {layout(q): p for p, q in quantized.items()}
  if len(specs) > 1:
    found = ", ".join(f"{p}: {'' if b is None else f'bits={b} group_size={g} '}symmetric={s}"
                      for (b, g, s), p in specs.items())  # fmt: skip
    what = "sym" if widths else "bits/group_size/sym"
    raise ValueError(f"a {fmt} config has one {what} for all layers; got {found}.")
  most = collections.Counter((q.spec.bits, q.spec.group_size) for q in quantized.values()).most_common(1)[0][0]
  return next(q.spec for q in quantized.values() if (q.spec.bits, q.spec.group_size) == most)


def hf_tensors(
  params, quantized: Callable[[str, QArray], dict[str, np.ndarray]], config: LlamaConfig
) -> dict[str, np.ndarray | shards.Cast]:
  """Every leaf as Hugging Face tensors: dense leaves in float16 (kernels transposed to [out, in]).

  Args:
    params: the Flax parameter tree (projections a family's checkpoints fuse are fused here, stacked experts
      split into one tensor each).
    quantized: ``(module name, QArray) -> {suffix: array}`` for quantized leaves.
    config: the model's config (Gemma's norms are stored less their offset).

  Returns:
    Hugging Face name -> array, or `shards.Cast` for dense leaves (converted to float16 as they are written, which
    raises ValueError naming the tensor when a value overflows float16).
  """
  tensors = {}
  for path, leaf in leaves_with_paths(split_experts(fuse_params(params, config), config)):
    name = hf_tensor_name(path)
    if is_qarray(leaf):
      module = name.removesuffix(".weight")
      tensors.update({f"{module}.{suffix}": value for suffix, value in quantized(module, leaf).items()})
      continue
    w, offset = np.asarray(leaf), norm_offset(config, name)
    w = w.astype(np.float32) - np.float32(offset) if offset else w
    tensors[name] = shards.Cast(name, w, np.float16, transpose=path.endswith("/kernel"))
  return tensors


def write_weights(
  directory: str,
  config: LlamaConfig,
  params,
  quantized: Callable[[str, QArray], dict[str, np.ndarray]],
  *,
  max_shard_bytes: int = MAX_SHARD_BYTES,
  check: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> tuple[Params, LlamaConfig]:
  """Writes the weights of a Hugging Face directory (`hf_tensors`) a part at a time; see `qjax.formats.shards`.

  Args:
    directory: an existing directory.
    config: the model's config.
    params: the parameter tree, or a stream of its parts (full-path subtrees, consumed one at a time).
    quantized: ``(module name, QArray) -> {suffix: array}`` for quantized leaves.
    max_shard_bytes: largest safetensors file; more tensors go to ``model-0000i-of-0000n.safetensors`` with
      ``model.safetensors.index.json``.
    check: called with each part's tensors before they are written (checks that span a block's tensors).

  Returns:
    (`shards.skeleton` of all parts: shapes and specs for the config, the config with ``tie_word_embeddings`` as
    written: tied exactly when no ``lm_head`` came).
  """
  weights = shards.SafetensorsWriter(directory, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
  seen: dict = {}
  try:
    for part in shards.as_parts(params):
      tensors = hf_tensors(part, quantized, config)
      if check is not None:
        check(tensors)
      for name in list(tensors):
        weights.add(name, tensors.pop(name))
      shards.merge(seen, shards.skeleton(part))
      del part, tensors  # a stream's part is released before the next one is made
  except BaseException:
    weights.spill.close()
    raise
  weights.close()
  return seen, dataclasses.replace(config, tie_word_embeddings="lm_head" not in seen)


def write_hf_directory(
  directory: str,
  config: LlamaConfig,
  quantization_config: dict[str, Any],
  tokenizer,
  *,
  extra_json: dict[str, dict] | None = None,
) -> None:
  """Writes a quantized Hugging Face directory's files beside its weights (`write_weights`): ``config.json``, extra
  JSON files, the tokenizer (callers make the whole directory atomic, see `qjax.formats.output`).

  Args:
    directory: the directory the weights were written to.
    config: the model config (written with ``torch_dtype: float16`` and `quantization_config`).
    quantization_config: the ``config.json["quantization_config"]`` block.
    tokenizer: a `transformers` tokenizer, saved beside the weights (None: no tokenizer files).
    extra_json: more files to write, name -> content (e.g. ``quantize_config.json``).
  """
  hf = {**config.to_hf_dict(), "torch_dtype": "float16", "quantization_config": quantization_config}
  for file, content in {"config.json": hf, **(extra_json or {})}.items():
    with open(os.path.join(directory, file), "w") as f:
      json.dump(content, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)


def read_quantization_config(model_dir: str) -> dict[str, Any] | None:
  """``config.json["quantization_config"]``, else the legacy ``quantize_config.json`` (AutoGPTQ), else None.

  Raises:
    InputError: naming the file when it is not JSON or the block is not an object.
  """
  path = os.path.join(model_dir, "config.json")
  config = read_json(path)
  qc = config.get("quantization_config") if isinstance(config, dict) else None
  legacy = os.path.join(model_dir, "quantize_config.json")
  if qc is None and os.path.lexists(legacy):
    path, qc = legacy, {"quant_method": "gptq", **_object(read_json(legacy), legacy)}
  return None if qc is None else _object(qc, path)


def _object(value, path: str) -> dict:
  if not isinstance(value, dict):
    raise InputError(f"{path}: quantization_config expected a JSON object, got {show(value)}.")
  return value


class HfTensors(TensorFiles):
  """The tensors of a Hugging Face directory (see `TensorFiles`), any dtype, recording which were read."""

  def __init__(self, model_dir: str):
    super().__init__(model_dir)
    self.read_names: set[str] = set()

  def get_many(self, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors by name, as stored (numpy; bfloat16 as ml_dtypes' bfloat16)."""
    got = self.read(names, "flax")  # the flax framework reads bfloat16 on every safetensors version
    self.read_names.update(names)
    return {name: np.asarray(value) for name, value in got.items()}

  def check_all_read(self) -> None:
    """Raises if the checkpoint holds tensors the config does not describe (they would be silently dropped)."""
    unread = sorted(n for n in set(self.files) - self.read_names if not n.endswith("rotary_emb.inv_freq"))
    if unread:
      raise InputError(
        f"{self.source}: tensors the config does not describe: {unread[:5]}{' …' if len(unread) > 5 else ''}."
      )


def linear_shape(config: LlamaConfig, module: str) -> tuple[int, int]:
  """(in, out) of a linear module such as ``model.layers.0.self_attn.k_proj`` or ``lm_head``."""
  out, inp = linear_shapes(config)[module.rsplit(".", maxsplit=1)[-1]]
  return inp, out


def check_tensor(
  name: str, value: np.ndarray, shape: tuple[int, ...], dtypes: tuple, described: str, *, source: str | None = None
) -> None:
  """Raises naming the tensor (and its directory, `source`) when its shape or dtype is not what the config implies.

  Raises:
    InputError: "<source>: <name>: expected shape ... for <described>, got ...".
  """
  if tuple(value.shape) != tuple(shape) or np.dtype(value.dtype) not in [np.dtype(d) for d in dtypes]:
    allowed = "/".join(str(np.dtype(d)) for d in dtypes)
    raise InputError(
      f"{source + ': ' if source else ''}{name}: expected shape {tuple(shape)} {allowed} for {described}, got "
      f"{tuple(value.shape)} {value.dtype}; the checkpoint's config does not describe its tensors."
    )


def read_hf_params(
  tensors: HfTensors,
  config: LlamaConfig,
  quantized: Callable[[str, tuple[int, int]], QArray],
  *,
  dtype=np.float32,
  packed_suffix: str = "qweight",
) -> dict:
  """The Flax parameter tree of a quantized Hugging Face directory.

  The layer count and every dense tensor's shape and dtype are checked against the config from the headers before
  any tensor is read; each quantized linear is checked by `quantized`.

  Args:
    tensors: the directory's tensors.
    config: the model config.
    quantized: ``(module name, (in, out)) -> QArray`` for linears stored with a `packed_suffix` tensor.
    dtype: dtype of the dense leaves.
    packed_suffix: the tensor that marks a quantized linear (``qweight`` in GPTQ and AWQ).

  Raises:
    InputError: for missing tensors, tensors the config does not describe, dense tensors of the wrong shape or
      dtype, or holding NaN or Inf.
  """
  config_path = os.path.join(tensors.source, "config.json")
  check_layer_count(tensors.files, config, layer=HF_LAYER, config_path=config_path, source=tensors.source)
  dense_shapes = {
    name: shape
    for name, shape in hf_tensor_shapes(config).items()
    if not (name.endswith(".weight") and f"{name.removesuffix('.weight')}.{packed_suffix}" in tensors)
  }
  tensors.check_dense(dense_shapes, config_path)

  def dense(name: str, transpose: bool) -> np.ndarray:
    w = tensors.get_many([name])[name]
    check_finite(name, w, tensors.files[name])
    w = (w.astype(np.float32) + norm_offset(config, name)).astype(dtype)
    return np.ascontiguousarray(w.T) if transpose else w

  def leaf(name: str, transpose: bool, shape: tuple[int, int] | None = None):
    module = name.removesuffix(".weight")
    if transpose and f"{module}.{packed_suffix}" in tensors:
      return quantized(module, shape or linear_shape(config, module))
    return dense(name, transpose)

  def experts(i: int):
    names = hf_expert_tensors(config, i)
    shapes = {p: out_in[::-1] for p, out_in in expert_shapes(config).items()}
    leaves = {name: leaf(name, True, shapes[p]) for name, (p, _) in names.items()}
    kinds = {p: {is_qarray(leaves[n]) for n, (q, _) in names.items() if q == p} for p in shapes}
    mixed = next((p for p, k in kinds.items() if len(k) > 1), None)
    if mixed is not None:
      raise InputError(f"{tensors.source}: layer {i}'s {mixed} experts are partly quantized; qjax stacks all or none.")
    return stack_experts(leaves, names, config.num_experts)

  model: dict = {"embed_tokens": {"embedding": dense("model.embed_tokens.weight", False)}}
  for i in range(config.num_hidden_layers):
    layer: dict = {}
    for name, (path, transpose) in hf_layer_tensors(config, i).items():
      node = layer
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = leaf(name, transpose)
    if config.moe(i):
      layer["mlp"]["experts"] = experts(i)
    model[f"layers_{i}"] = split_layer(layer, config)
  model["norm"] = {"scale": dense("model.norm.weight", False)}
  params = {"model": model}
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": leaf("lm_head.weight", True)}
  tensors.check_all_read()
  return params
