"""Reading Llama-family checkpoints lazily: the `Checkpoint` interface and Hugging Face safetensors directories.

A `Checkpoint` hands out one piece of the model at a time (`embed_params`,
`layer_params(i)`, `head_params`), each read from disk only when asked, so the
calibration runner holds one decoder block at a time. `params()` assembles the whole
Flax parameter tree. Weights are read with safetensors only, never pickles (GGUF files: `qjax.formats.gguf_reader`).
"""

import abc
import json
import os
import re
import stat
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from qjax.core.errors import InputError
from qjax.core.files import one_line, regular_file
from qjax.models.config import LlamaConfig, read_json, show
from qjax.models.fused import fused_modules, fused_of, part_widths, split_layer

Params = dict

# Hugging Face module name (inside `model.layers.{i}.`) -> Flax path inside `model/layers_{i}`.
LAYER_MODULES = (
  "self_attn.q_proj",
  "self_attn.k_proj",
  "self_attn.v_proj",
  "self_attn.o_proj",
  "mlp.gate_proj",
  "mlp.up_proj",
  "mlp.down_proj",
)
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
GEMMA_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma: a norm on each block output too
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # Qwen3: (head_dim,) weights shared by every head
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Where a family's checkpoints keep a sparse layer's router and experts, and its names for the expert projections.
MOE_NAMES = {"MixtralForCausalLM": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})}
QWEN_MOE_NAMES = ("mlp", {p: p for p in EXPERT_PROJECTIONS})


WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20
MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound on its JSON header
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# What qjax reads: safetensors' float8/float4/complex tensors have no numpy dtype on every version (reading one fails).
FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}  # quantized weights' codes, read as stored
READABLE_DTYPES = (*FLOAT_DTYPES, *FP8_DTYPES, "BOOL", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")
MAX_SHORT_GROUP = 1024  # a quantization group may exceed a small layer's input width, up to this
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# What reading a hostile safetensors file may raise, besides SafetensorError.
READ_ERRORS = (SafetensorError, OSError, ValueError, OverflowError, TypeError, AttributeError, MemoryError)


class TensorInfo(NamedTuple):
  """A tensor as its file's header describes it: shape and safetensors dtype name (``"F32"``, ``"I32"``, …)."""

  shape: tuple[int, ...]
  dtype: str


def set_nested(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def hf_layer_tensors(config: LlamaConfig, i: int) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (Flax path inside the layer, transposed?) for decoder layer `i`, as the checkpoint stores it:
  a family that fuses projections (Phi-3) lists ``qkv_proj`` and ``gate_up_proj``, whose Flax paths
  `qjax.models.fused.split_layer` then splits."""
  names = {}
  fused = fused_of(config)
  modules = dict.fromkeys(fused.get(module, module) for module in LAYER_MODULES)
  if config.moe(i):  # the router; the experts are `hf_expert_tensors`
    names[f"model.layers.{i}.{moe_names(config)[0]}.gate.weight"] = ("mlp", "gate", "kernel"), True
    modules = [m for m in modules if not m.startswith("mlp.")]
  for module in modules:
    path = tuple(module.split("."))
    names[f"model.layers.{i}.{module}.weight"] = (*path, "kernel"), True
    has_bias = (config.attention_bias and module.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "qkv_proj")) or (
      config.mlp_bias and module.startswith("mlp.")
    )
    if has_bias:
      names[f"model.layers.{i}.{module}.bias"] = (*path, "bias"), False
  for norm in LAYER_NORMS + (GEMMA_NORMS if config.gemma else ()) + (HEAD_NORMS if config.qk_norm else ()):
    names[f"model.layers.{i}.{norm}.weight"] = (*norm.split("."), "scale"), False
  return names


def moe_names(config: LlamaConfig) -> tuple[str, dict[str, str]]:
  """(the module holding a sparse layer's router and experts, {qjax projection: the checkpoint's name for it})."""
  return MOE_NAMES.get(config.architecture, QWEN_MOE_NAMES)


def hf_expert_tensors(config: LlamaConfig, i: int) -> dict[str, tuple[str, int]]:
  """HF tensor name -> (projection, expert) for the experts of decoder layer `i` (none for a dense layer). Each is
  ``[out, in]``; qjax holds a projection's experts stacked as ``mlp/experts/{projection}/kernel`` (E, in, out)."""
  if not config.moe(i):
    return {}
  module, projections = moe_names(config)
  return {
    f"model.layers.{i}.{module}.experts.{e}.{projections[p]}.weight": (p, e)
    for e in range(config.num_experts)
    for p in EXPERT_PROJECTIONS
  }


def expert_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
  """[out, in] of one expert's projection."""
  hidden, inter = config.hidden_size, config.expert_size
  return {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def norm_offset(config: LlamaConfig, hf_name: str) -> float:
  """What the norm multiplier qjax holds exceeds the Hugging Face tensor `hf_name` by: 1 for Gemma's norms (stored as
  ``w`` for a multiplier ``1 + w``), else 0. Readers add it, writers subtract it."""
  return config.norm_offset if hf_name.endswith("norm.weight") else 0.0


def linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
  """Hugging Face [out, in] shape of each linear module of a decoder layer, and of ``lm_head``."""
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  hidden, inter = config.hidden_size, config.intermediate_size
  return {
    "q_proj": (q, hidden),
    "k_proj": (kv, hidden),
    "v_proj": (kv, hidden),
    "qkv_proj": (q + 2 * kv, hidden),
    "o_proj": (hidden, q),
    "gate_proj": (inter, hidden),
    "up_proj": (inter, hidden),
    "gate_up_proj": (2 * inter, hidden),
    "down_proj": (hidden, inter),
    "lm_head": (config.vocab_size, hidden),
  }


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a Hugging Face checkpoint of `config` holds, with its shape ([out, in] for linears).

  Call `check_layer_count` first: this lists ``num_hidden_layers`` layers, however many that is.
  """
  linear = linear_shapes(config) | {"gate": (config.num_experts, config.hidden_size)}
  shapes = {"model.embed_tokens.weight": linear["lm_head"], "model.norm.weight": (config.hidden_size,)}
  norms = {"q_norm": (config.head_dim,), "k_norm": (config.head_dim,)}
  for i in range(config.num_hidden_layers):
    for name, (path, _) in hf_layer_tensors(config, i).items():
      out_in = linear.get(path[-2]) or norms.get(path[-2], (config.hidden_size,))
      shapes[name] = out_in if path[-1] == "kernel" else out_in[:1]
    shapes.update({name: expert_shapes(config)[p] for name, (p, _) in hf_expert_tensors(config, i).items()})
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = linear["lm_head"]
  return shapes


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every leaf of the Flax parameter tree of `config` by '/'-joined path, with its shape (kernels [in, out])."""
  shapes = {"model/embed_tokens/embedding": (config.vocab_size, config.hidden_size)}
  hf = hf_tensor_shapes(config)
  for i in range(config.num_hidden_layers):
    for name, (path, transpose) in hf_layer_tensors(config, i).items():
      shape = hf[name][::-1] if transpose else hf[name]
      module = ".".join(path[:-1])
      if module not in fused_modules(config):
        shapes["/".join(("model", f"layers_{i}", *path))] = shape
        continue
      for part, width in zip(fused_modules(config)[module], part_widths(config, module), strict=True):
        shapes["/".join(("model", f"layers_{i}", *part.split("."), path[-1]))] = (*shape[:-1], width)  # [in, out]
    if config.moe(i):
      for p, (out, in_) in expert_shapes(config).items():
        shapes[f"model/layers_{i}/mlp/experts/{p}/kernel"] = (config.num_experts, in_, out)
  shapes["model/norm/scale"] = (config.hidden_size,)
  if not config.tie_word_embeddings:
    shapes["lm_head/kernel"] = (config.hidden_size, config.vocab_size)
  return shapes


def stack_experts(kernels: dict[str, Any], names: dict[str, tuple[str, int]], num_experts: int) -> Params:
  """``{projection: {"kernel": stack}}`` from each expert's (in, out) kernel by Hugging Face name (`hf_expert_tensors`
  names): dense kernels stack to (E, in, out), QArrays of one spec to a stacked QArray."""
  by_projection: dict[str, list] = {}
  for name, (p, e) in names.items():
    by_projection.setdefault(p, [None] * num_experts)[e] = kernels[name]
  stack = lambda *xs: np.stack([np.asarray(x) for x in xs])
  return {p: {"kernel": jax.tree.map(stack, *ws)} for p, ws in by_projection.items()}


def split_experts(params: Params, config: LlamaConfig) -> Params:
  """`params` with each sparse layer's MLP as checkpoints name it: the router and one kernel per expert
  (``{module}/experts/{e}/{projection}/kernel``, dense or a QArray each) in place of the stacks (`moe_names`)."""
  module, projections = moe_names(config)
  model = dict(params["model"])
  for name, layer in model.items():
    mlp = layer.get("mlp", {}) if name.startswith("layers_") else {}
    if "experts" not in mlp:
      continue
    stacks = {p: mlp["experts"][p]["kernel"] for p in EXPERT_PROJECTIONS}
    experts = {str(e): {projections[p]: {"kernel": jax.tree.map(lambda x, e=e: x[e], w)} for p, w in stacks.items()}
               for e in range(config.num_experts)}  # fmt: skip
    layer = {k: v for k, v in layer.items() if k != "mlp"}
    model[name] = {**layer, module: {"gate": mlp["gate"], "experts": experts}}
  return {**params, "model": model}


def check_layer_count(names, config: LlamaConfig, *, layer: re.Pattern, config_path: str, source: str) -> None:
  """Raises unless the tensors hold exactly layers ``0 .. num_hidden_layers - 1``.

  Checked before any per-layer list is built, so a huge ``num_hidden_layers`` is refused at once.

  Raises:
    InputError: naming `source` and `config_path`: tensors of layers beyond the config's count ("tensors the config
      does not describe"), or the first layer the config implies that has no tensors.
  """
  n = config.num_hidden_layers
  present = {int(m[1]) for name in names if (m := layer.match(name))}
  beyond = sorted(name for name in names if (m := layer.match(name)) and int(m[1]) >= n)
  if beyond:
    raise InputError(
      f"{source}: tensors the config does not describe: {beyond[:3]}{' …' if len(beyond) > 3 else ''} "
      f"({config_path} says num_hidden_layers={n})."
    )
  if len(present) < n:
    first = min(set(range(len(present) + 1)) - present)
    raise InputError(
      f"{source}: tensors missing from the checkpoint: layer {first} has none, but {config_path} says "
      f"num_hidden_layers={n}."
    )


def check_shape(name: str, info: TensorInfo, shape: tuple[int, ...], *, config_path: str, source: str) -> None:
  """Raises naming the tensor, its file and the config when a dense tensor's header disagrees with the config."""
  if tuple(info.shape) != tuple(shape):
    raise InputError(f"{source}: tensor {name} expected shape {tuple(shape)} from {config_path}, got {info.shape}.")
  if info.dtype not in FLOAT_DTYPES:
    raise InputError(f"{source}: tensor {name} expected a float dtype ({'/'.join(FLOAT_DTYPES)}), got {info.dtype}.")


def check_group_length(group_size: int, k: int, what: str) -> None:
  """Raises unless a group is at most ``max(k, MAX_SHORT_GROUP)`` long: dequantizing pads a contraction length of `k`
  to whole groups, so a hostile group size would allocate without bound. (-1 is one group per output channel.)

  Raises:
    InputError: naming `what` (the file and tensor).
  """
  if group_size > max(k, MAX_SHORT_GROUP):
    raise InputError(
      f"{what}: group_size={group_size} expected -1 or at most max(in={k}, {MAX_SHORT_GROUP}), the input width."
    )


def check_finite(name: str, value: np.ndarray, source: str) -> None:
  """Raises naming the tensor when it holds NaN or Inf (a model that would evaluate to ``perplexity nan``)."""
  if not np.isfinite(value).all():
    raise InputError(f"{source}: tensor {name} holds NaN or Inf values.")


def _allowed_roots(model_dir: str) -> list[str]:
  """Where a model directory's files may resolve: inside it, and for a Hugging Face hub cache snapshot
  (``models--X/snapshots/REV``, whose files are links into ``models--X/blobs``) inside its repository's blobs."""
  root = os.path.realpath(model_dir)
  roots = [root]
  if os.path.basename(os.path.dirname(root)) == "snapshots":
    roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
  return roots


def model_file(model_dir: str, name, source: str) -> str:
  """The path of a file an index names, confined to `model_dir` and checked to be a regular file.

  A name is refused before anything is looked up when it is not a plain relative name, contains a ``..``
  component, or resolves (following links) outside the directory; the message is the same whether or not such
  an outside path exists, so a hostile index learns nothing about the machine.

  Raises:
    FileNotFoundError: if the (confined) file does not exist.
    InputError: naming `source` and the entry otherwise.
  """
  outside = InputError(f"{source}: entry {show(name)} expected a file name inside the model directory.")
  if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
    raise outside
  if ".." in re.split(r"[/\\]", name):
    raise outside
  path = os.path.normpath(os.path.join(model_dir, name))  # "./a" and "a" are one file
  real = os.path.realpath(path)
  if not any(os.path.commonpath([real, root]) == root for root in _allowed_roots(model_dir)):
    raise outside
  regular_file(path, source)
  return path


def safetensors_header(path: str) -> dict[str, TensorInfo]:
  """Name -> `TensorInfo` of every tensor of a safetensors file, from its header alone (no tensor data is read).

  The 8-byte header length is checked against the file size first, so a hostile length cannot make anyone
  allocate; safetensors then checks that the tensors exactly cover the rest of the file.

  Raises:
    InputError: naming the file when it is not a regular file, its header is too long or malformed, or it is
      truncated.
  """
  size = regular_file(path, path).st_size
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise InputError(f"{path}: expected a regular file, got something else.")
    head = os.read(fd, 8)
  finally:
    os.close(fd)
  length = int.from_bytes(head, "little") if len(head) == 8 else None
  if length is None or length > min(size - 8, MAX_HEADER_BYTES):
    raise InputError(
      f"{path}: unreadable safetensors file (header length {length} for a file of {size} bytes); is it truncated?"
    )
  try:
    with safe_open(path, "numpy") as f:
      slices = {name: f.get_slice(name) for name in f.keys()}
      return {name: TensorInfo(tuple(sl.get_shape()), sl.get_dtype()) for name, sl in slices.items()}
  except READ_ERRORS as e:
    raise InputError(f"{path}: unreadable safetensors file ({one_line(e)}); is it truncated?") from e


def read_safetensors(path: str, names: list[str], framework: str = "numpy") -> dict:
  """Tensors `names` of a safetensors file whose header was checked (`safetensors_header`); FP8 ones (which
  safetensors' numpy and flax readers do not convert) as ml_dtypes arrays read from their byte ranges.

  Raises:
    InputError: naming the file for any error safetensors raises (a file changed or truncated since).
  """
  try:
    with safe_open(path, framework) as f:
      fp8 = {name for name in names if f.get_slice(name).get_dtype() in FP8_DTYPES}
      out = {name: f.get_tensor(name) for name in names if name not in fp8}
  except READ_ERRORS as e:
    raise InputError(f"{path}: unreadable safetensors file ({one_line(e)}); is it truncated?") from e
  return {**out, **(_read_raw(path, sorted(fp8)) if fp8 else {})}


def _read_raw(path: str, names: list[str]) -> dict[str, np.ndarray]:
  """Tensors of dtypes in `FP8_DTYPES` from their byte ranges, each checked against its shape and the file."""
  size = os.path.getsize(path)
  out = {}
  with open(path, "rb") as f:
    length = int.from_bytes(f.read(8), "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
      raise InputError(f"{path}: unreadable safetensors file (header length {length}); is it truncated?")
    try:
      header = json.loads(f.read(length))
      entries = {name: (header[name]["dtype"], tuple(header[name]["shape"]), header[name]["data_offsets"])
                 for name in names}  # fmt: skip
    except (ValueError, KeyError, TypeError) as e:
      raise InputError(f"{path}: unreadable safetensors header ({one_line(e)}); did the file change?") from e
    for name, (dtype, shape, (begin, end)) in entries.items():
      if end - begin != int(np.prod(shape)) or not 0 <= begin <= end <= size - 8 - length:
        raise InputError(f"{path}: tensor {name}'s byte range [{begin}, {end}) does not hold shape {shape}.")
      f.seek(8 + length + begin)
      out[name] = np.frombuffer(f.read(end - begin), np.uint8).view(FP8_DTYPES[dtype]).reshape(shape)
  return out


def read_weight_map(index_path: str) -> dict[str, str]:
  """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name, as written.

  Raises:
    InputError: naming the index when it is too large, not JSON, or its weight_map is not an object of strings.
  """
  index = read_json(index_path, max_bytes=MAX_INDEX_BYTES)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise InputError(
      f"{index_path}: weight_map expected an object of tensor name -> file name, got {show(weight_map)}."
    )
  bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
  if bad is not None:
    raise InputError(f"{index_path}: weight_map entry {show(bad[0])} expected a file name, got {show(bad[1])}.")
  return weight_map


class TensorFiles:
  """The tensors of a Hugging Face directory: ``model.safetensors``, or the shards its index names.

  Everything is checked before any tensor data is read: the index (size, JSON, every shard name confined to the
  directory and a regular file) and every file's header; the index and the headers must agree tensor for tensor.

  Attributes:
    source: the directory, for messages.
    files: tensor name -> path of the file holding it.
    info: tensor name -> `TensorInfo` from the headers.

  Raises:
    FileNotFoundError: naming the missing weights, or the shards the index names that do not exist.
    InputError: naming the index or file for anything else.
  """

  def __init__(self, model_dir: str):
    self.source = model_dir
    index = os.path.join(model_dir, WEIGHTS_INDEX)
    if os.path.lexists(index):
      weight_map = read_weight_map(index)
      paths = self._shards(model_dir, index, set(weight_map.values()))
      self.files = {name: paths[file] for name, file in weight_map.items()}
      self.info = {}
      for path in sorted(set(paths.values())):
        self.info.update(self._agreeing_header(index, path))
    elif os.path.lexists(os.path.join(model_dir, WEIGHTS)):
      single = model_file(model_dir, WEIGHTS, model_dir)
      self.info = safetensors_header(single)
      self.files = dict.fromkeys(self.info, single)
    else:
      raise FileNotFoundError(f"{model_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}.")

  def _agreeing_header(self, index: str, path: str) -> dict[str, TensorInfo]:
    """A shard's header, which must hold exactly the tensors the index places in it (nothing lost, nothing extra)."""
    header = safetensors_header(path)
    listed = {name for name, file in self.files.items() if file == path}
    if listed - set(header):
      raise InputError(f"{index}: names tensor {sorted(listed - set(header))[0]!r} in {path}, which does not hold it.")
    if set(header) - listed:
      raise InputError(f"{path}: holds tensors the index does not list: {sorted(set(header) - listed)[:3]}.")
    return header

  @staticmethod
  def _shards(model_dir: str, index: str, names: set[str]) -> dict[str, str]:
    """Shard file name -> path, every name confined first; then every missing one named at once."""
    missing = []
    paths = {}
    for name in sorted(names):
      try:
        paths[name] = model_file(model_dir, name, index)
      except FileNotFoundError:
        missing.append(name)
    if missing:
      raise FileNotFoundError(f"{index}: the index names missing weight files {missing[:5]}.")
    return paths

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def read(self, names: list[str], framework: str = "numpy") -> dict:
    """Tensors by name, as stored; each file is opened for the call only (a file kept open stays mapped)."""
    missing = [n for n in names if n not in self.files]
    if missing:
      raise InputError(f"{self.source}: tensors {missing[:5]} are missing from the checkpoint.")
    unreadable = next((n for n in names if self.info[n].dtype not in READABLE_DTYPES), None)
    if unreadable is not None:
      raise InputError(
        f"{self.files[unreadable]}: tensor {unreadable} has dtype {self.info[unreadable].dtype}; qjax reads "
        f"{'/'.join(READABLE_DTYPES)}."
      )
    by_file: dict[str, list[str]] = {}
    for name in names:
      by_file.setdefault(self.files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
      out.update(read_safetensors(file, file_names, framework))
    return out

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a float tensor (the first axis), as stored, without reading the rest."""
    path = self.files[name]
    try:
      with safe_open(path, "numpy") as f:
        return f.get_slice(name)[start:stop]
    except READ_ERRORS as e:
      raise InputError(f"{path}: unreadable safetensors file ({one_line(e)}); is it truncated?") from e

  def check_dense(self, expected: dict[str, tuple[int, ...]], config_path: str) -> None:
    """Raises naming the tensor unless each of `expected` is present with that shape and a float dtype."""
    missing = sorted(set(expected) - set(self.info))
    if missing:
      raise InputError(
        f"{self.source}: tensors missing from the checkpoint (expected by {config_path}): {missing[:5]}"
        f"{' …' if len(missing) > 5 else ''}."
      )
    for name, shape in expected.items():
      check_shape(name, self.info[name], shape, config_path=config_path, source=self.files[name])


class Checkpoint(abc.ABC):
  """A model on disk, read piece by piece.

  Attributes:
    config: the model's `LlamaConfig`.
    source: the file or directory, for messages.
  """

  config: LlamaConfig
  source: str

  @abc.abstractmethod
  def embed_params(self) -> Params:
    """``{"embedding": (vocab, hidden)}``."""

  @abc.abstractmethod
  def layer_params(self, i: int) -> Params:
    """The Flax params of decoder layer `i` (``model/layers_{i}``)."""

  @abc.abstractmethod
  def head_params(self) -> Params:
    """``{"norm": {"scale"}, "lm_head": {"kernel"}}`` (no lm_head when embeddings are tied)."""

  @abc.abstractmethod
  def tokenizer(self):
    """A `transformers` tokenizer."""

  def params(self) -> Params:
    """The whole Flax parameter tree of `qjax.models.LlamaForCausalLM`."""
    model = {"embed_tokens": self.embed_params()}
    for i in range(self.config.num_hidden_layers):
      model[f"layers_{i}"] = self.layer_params(i)
    head = self.head_params()
    model["norm"] = head["norm"]
    params = {"model": model}
    if "lm_head" in head:
      params["lm_head"] = head["lm_head"]
    return params


READ_CHUNK_ELEMENTS = 1 << 24
"""Matrices with more elements than this are read in row blocks of at most this many (`SafetensorsCheckpoint`)."""


def _is_large(shape: tuple[int, ...]) -> bool:
  return len(shape) == 2 and shape[0] * shape[1] > READ_CHUNK_ELEMENTS


def check_tokenizer(tokenizer, config: LlamaConfig, source: str):
  """Raises (InputError, naming `source`) when the tokenizer has more tokens than the embedding has rows."""
  if len(tokenizer) > config.vocab_size:
    raise InputError(
      f"{source}: the tokenizer has {len(tokenizer)} tokens but the embedding has {config.vocab_size} rows; "
      "the tokenizer does not belong to this model."
    )
  return tokenizer


class SafetensorsCheckpoint(Checkpoint):
  """A Hugging Face model directory: ``config.json`` and one or more ``*.safetensors`` files.

  Opening it checks, from the files' headers alone, that every tensor the config implies is present with its shape
  and a float dtype, and that no tensor is left that the config does not describe.

  Args:
    model_dir: the directory.
    dtype: numpy dtype tensors are converted to (float32 by default).

  Raises:
    FileNotFoundError: naming the missing file (config, index entry, or weights).
    InputError: naming the file (and tensor) for a bad config, index or safetensors file, tensors that disagree
      with the config, and NaN or Inf weights (when read).
  """

  def __init__(self, model_dir: str, dtype=np.float32):
    self.source = model_dir
    self.config = LlamaConfig.from_pretrained(model_dir)
    self.dtype = np.dtype(dtype)
    self._tensors = TensorFiles(model_dir)
    self._check(os.path.join(model_dir, "config.json"))

  def _check(self, config_path: str) -> None:
    names = set(self._tensors.info)
    check_layer_count(names, self.config, layer=HF_LAYER, config_path=config_path, source=self.source)
    expected = hf_tensor_shapes(self.config)
    self._tensors.check_dense(expected, config_path)
    extra = sorted(n for n in names - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    # Some tools save a tied head twice; the copy is unused (the embedding is the head), so only its shape matters.
    head = self._tensors.info.get("lm_head.weight")
    if self.config.tie_word_embeddings and head is not None and head.shape == expected["model.embed_tokens.weight"]:
      extra.remove("lm_head.weight")
    if extra:
      raise InputError(
        f"{self.source}: tensors the config does not describe: {extra[:5]}{' …' if len(extra) > 5 else ''} "
        f"(from {config_path})."
      )

  def get_many(self, names: list[str], *, transposed: bool = False) -> dict[str, np.ndarray]:
    """Tensors by Hugging Face name, converted to `self.dtype` (and transposed: kernels [in, out] from [out, in]).

    Each file is opened for the call only: a file kept open stays memory-mapped, and
    every page read would count against the process for the rest of the run. Conversion and transposition are one
    copy (an embedding-sized matrix is a GB or more).

    Raises:
      InputError: naming the tensor when it holds NaN or Inf, or the file when it cannot be read.
    """
    large = [n for n in names if self._tensors.info[n].dtype in FLOAT_DTYPES and _is_large(self._tensors.info[n].shape)]
    out = {name: self._read_large(name, transposed) for name in large}
    tensors = self._tensors.read([n for n in names if n not in out])
    for name in names:
      if name in out:
        continue
      value = tensors.pop(name)
      check_finite(name, value, self._tensors.files[name])
      offset = norm_offset(self.config, name)  # added in float32, as transformers computes 1 + w
      value = value.astype(np.float32) + offset if offset else value
      out[name] = np.array(value.T if transposed else value, dtype=self.dtype, order="C")
      del value
    return out

  def _read_large(self, name: str, transposed: bool) -> np.ndarray:
    """A matrix larger than `READ_CHUNK_ELEMENTS` (an embedding, a head), read and converted a row block at a time
    into its result: held whole once, in `self.dtype`, never also as stored."""
    rows, cols = self._tensors.info[name].shape
    out = np.empty((cols, rows) if transposed else (rows, cols), self.dtype)
    step = max(1, READ_CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
      stop = min(start + step, rows)  # safetensors' slices do not clip
      block = self._tensors.read_rows(name, start, stop)
      check_finite(name, block, self._tensors.files[name])
      if transposed:
        out[:, start:stop] = block.T
      else:
        out[start:stop] = block
    return out

  def get(self, name: str) -> np.ndarray:
    """One tensor by its Hugging Face name, converted to `self.dtype`."""
    return self.get_many([name])[name]

  def names(self) -> list[str]:
    return sorted(self._tensors.files)

  def embed_params(self) -> Params:
    return {"embedding": self.get("model.embed_tokens.weight")}

  def layer_params(self, i: int) -> Params:
    names = hf_layer_tensors(self.config, i)
    kernels = [name for name, (_, transpose) in names.items() if transpose]
    tensors = {**self.get_many(kernels, transposed=True), **self.get_many([n for n in names if n not in kernels])}
    params = {}
    for name, (path, _) in names.items():
      set_nested(params, path, tensors.pop(name))
    experts = hf_expert_tensors(self.config, i)
    if experts:
      kernels = {name: w.T for name, w in self.get_many(list(experts)).items()}
      params["mlp"]["experts"] = stack_experts(kernels, experts, self.config.num_experts)
    return split_layer(params, self.config)

  def head_params(self) -> Params:
    head = {"norm": {"scale": self.get("model.norm.weight")}}
    if not self.config.tie_word_embeddings:
      head["lm_head"] = {"kernel": self.get_many(["lm_head.weight"], transposed=True)["lm_head.weight"]}
    return head

  def tokenizer(self):
    return self.load_tokenizer(self.source, self.config)

  @staticmethod
  def load_tokenizer(model_dir: str, config: LlamaConfig):
    """The tokenizer of a Hugging Face directory, checked against the embedding size."""
    from transformers import AutoTokenizer

    try:
      tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
      raise InputError(f"{model_dir}: cannot load the tokenizer ({one_line(e)}).") from e
    return check_tokenizer(tok, config, model_dir)
