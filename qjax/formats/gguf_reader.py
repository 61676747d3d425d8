"""Reading GGUF files (llama.cpp's container) as a lazily read `Checkpoint`: config from metadata, tensors
dequantized by `gguf`'s own numpy decoders, Q/K rows un-permuted to Hugging Face's order.

A GGUF file is not trusted: its header is walked by a bounded parser (`check_gguf_header`) before `gguf`'s reader,
which believes every count and length it reads, sees it; then the metadata is checked against the tensors' shapes.
"""

import dataclasses
import math
import mmap
import os
import re
import struct

import numpy as np

from qjax.core.errors import InputError
from qjax.core.files import one_line, regular_file
from qjax.models.checkpoint import (
  Checkpoint,
  Params,
  check_finite,
  check_layer_count,
  check_tokenizer,
  expert_shapes,
  hf_expert_tensors,
  hf_tensor_shapes,
  moe_names,
  set_nested,
)
from qjax.models.config import (
  LlamaConfig,
  RopeScaling,
  checked_config,
  config_float,
  config_int,
  expert_count,
  show,
)
from qjax.models.config import token_id as config_token_id
from qjax.models.fused import split_layer

# GGUF architecture -> (HF architecture, llama.cpp permuted the Q/K rows for its RoPE).
GGUF_ARCHITECTURES = {
  "llama": ("LlamaForCausalLM", True),
  "qwen2": ("Qwen2ForCausalLM", False),
  "qwen3": ("Qwen3ForCausalLM", False),
  "gemma3": ("Gemma3ForCausalLM", False),
  "phi3": ("Phi3ForCausalLM", False),
  "qwen3moe": ("Qwen3MoeForCausalLM", False),
}
# llama.cpp writes Mixtral as its llama architecture with experts.
MOE_ARCHITECTURES = {"llama": "MixtralForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}

# GGUF tensor name (inside `blk.{i}.`) -> HF module name (inside `model.layers.{i}.`), shared by every family.
GGUF_LAYER_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
}
QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}  # Qwen3, Gemma 3
# llama.cpp's ffn_norm is the norm the MLP reads: Gemma's post_attention_layernorm normalises the attention output.
MLP_NORM_NAMES = {"ffn_norm": "post_attention_layernorm"}
GEMMA_NORM_NAMES = {
  "ffn_norm": "pre_feedforward_layernorm",
  "post_attention_norm": "post_attention_layernorm",
  "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 stores fused projections: attn_qkv (q, k, v rows) and ffn_up holding gate and up (gate rows first).
FUSED_NAMES = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
UNFUSED_NAMES = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")
# A sparse layer's router and stacked experts (qjax's module paths, whatever the family's checkpoints call them).
MOE_NAMES = {
  "ffn_gate_inp": "mlp.gate",
  "ffn_gate_exps": "mlp.experts.gate_proj",
  "ffn_up_exps": "mlp.experts.up_proj",
  "ffn_down_exps": "mlp.experts.down_proj",
}
DENSE_MLP_NAMES = ("ffn_gate", "ffn_up", "ffn_down")
LLAMA_CPP_SWA_PATTERN = 6  # llama.cpp's Gemma 3 default: every 6th layer global
# LongRoPE's per-frequency divisors, one tensor each for the short and the long context (Phi-3).
ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG = "rope_factors_short.weight", "rope_factors_long.weight"


def gguf_layer_names(config: LlamaConfig) -> dict[str, str]:
  """GGUF tensor name (inside ``blk.{i}.``) -> Hugging Face module (inside ``model.layers.{i}.``) for `config`'s
  family, as its checkpoints store it (Phi-3's fused projections as such)."""
  names = dict(GGUF_LAYER_NAMES)
  if config.fused_projections:
    names = {k: v for k, v in names.items() if k not in UNFUSED_NAMES} | FUSED_NAMES
  return {
    **names,
    **(GEMMA_NORM_NAMES if config.gemma else MLP_NORM_NAMES),
    **(QK_NORM_NAMES if config.qk_norm else {}),
    **(MOE_NAMES if config.num_experts else {}),
  }


def gguf_block_names(config: LlamaConfig, i: int) -> dict[str, str]:
  """`gguf_layer_names` of the tensors block `i` holds: a sparse layer's router and experts, or a dense MLP."""
  skip = DENSE_MLP_NAMES if config.moe(i) else tuple(MOE_NAMES)
  return {k: v for k, v in gguf_layer_names(config).items() if k not in skip}


def hf_to_gguf_layer_names(config: LlamaConfig) -> dict[str, str]:
  """Hugging Face module (inside ``model.layers.{i}.``) -> GGUF tensor name (inside ``blk.{i}.``)."""
  return {hf: name for name, hf in gguf_layer_names(config).items()}


def llama_cpp_gemma3_attention_scalar(layers: int, hidden: int, heads: int, head_dim: int) -> int:
  """The ``query_pre_attn_scalar`` llama.cpp derives for Gemma 3 (GGUF has no key for it): ``head_dim``, except
  ``hidden / heads`` for the 62-layer 27B model."""
  return hidden // heads if layers == 62 else head_dim


def llama_cpp_layer_types(n_layers: int, pattern: int = LLAMA_CPP_SWA_PATTERN) -> tuple[str, ...]:
  """The layer types llama.cpp assumes for a sliding-window pattern of `pattern` (0: every layer sliding)."""
  sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]
  return tuple("sliding_attention" if s else "full_attention" for s in sliding)


GGUF_LAYER = re.compile(r"blk\.(\d+)\.")

# ---- the header, walked with every count and length checked against the bytes left ----

GGUF_VERSIONS = (2, 3)
HEADER_BYTES = 24  # magic, version, tensor count, metadata count
MIN_KV_BYTES = 13  # key length (8), value type (4), the smallest value (1)
MIN_TENSOR_INFO_BYTES = 24  # name length (8), dimension count (4), ggml type (4), data offset (8)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
MAX_ARRAY_ITEMS = 1 << 21  # over all metadata arrays: `gguf`'s reader spends tens of µs per element
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> size
STRING, ARRAY, UINT32 = 8, 9, 4
INTEGER_TYPES = ("I8", "I16", "I32", "I64")
# What `gguf`'s reader may still raise on a file it cannot read.
READER_ERRORS = (IndexError, KeyError, ValueError, OverflowError, struct.error, TypeError, MemoryError, OSError)


class _Cursor:
  """Reads of a mapped GGUF file, each checked against the bytes left, so no count or length is believed."""

  def __init__(self, data: mmap.mmap, path: str, endian: str):
    self.data, self.path, self.endian, self.pos = data, path, endian, 0
    self.array_items = 0

  def error(self, what: str) -> InputError:
    return InputError(f"{self.path}: not a readable GGUF file ({what} at byte {self.pos}).")

  def take(self, n: int, what: str) -> bytes:
    if n > len(self.data) - self.pos:
      raise self.error(f"{what} needs {n} bytes, {len(self.data) - self.pos} are left; is it truncated?")
    self.pos += n
    return self.data[self.pos - n : self.pos]

  def number(self, fmt: str, what: str) -> int:
    return struct.unpack(self.endian + fmt, self.take(struct.calcsize(fmt), what))[0]

  def string(self, what: str) -> str:
    raw = self.take(self.number("Q", f"{what} length"), what)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise self.error(f"{what} is not UTF-8") from e

  def value(self, vtype: int, what: str, depth: int = 0) -> None:
    """Skips one metadata value of GGUF type `vtype`, checking every length and count inside it."""
    if vtype in SCALAR_BYTES:
      self.take(SCALAR_BYTES[vtype], what)
    elif vtype == STRING:
      self.string(what)
    elif vtype == ARRAY and depth < MAX_ARRAY_DEPTH:
      item, count = self.number("I", f"{what} item type"), self.number("Q", f"{what} count")
      if item not in SCALAR_BYTES and item not in (STRING, ARRAY):
        raise self.error(f"{what} has items of unknown type {item}")
      least = SCALAR_BYTES.get(item, 8 if item == STRING else 12)  # a string's length, an array's type and count
      if count * least > len(self.data) - self.pos:
        raise self.error(f"{what} claims {count} items, more than the file holds; is it truncated?")
      self.array_items += count
      if self.array_items > MAX_ARRAY_ITEMS:
        raise self.error(f"{what} brings the metadata arrays to {self.array_items} items, over {MAX_ARRAY_ITEMS}")
      if item in SCALAR_BYTES:
        self.take(count * SCALAR_BYTES[item], what)
        return
      for i in range(count):
        self.value(item, f"{what}[{i}]", depth + 1)
    else:
      raise self.error(f"{what} has unknown type {vtype}" if vtype != ARRAY else f"{what} nests arrays too deep")


def check_gguf_header(path: str) -> None:
  """Walks a GGUF file's header with every count, length, type code and offset checked against the file.

  Checked: magic and version (2 or 3); metadata and tensor counts the file size can hold; each metadata key and
  value (string lengths, array counts, nested arrays, known types, UTF-8, no duplicate keys, a power-of-two
  ``general.alignment``); each tensor's name, 1 to 4 positive dimensions, a known ggml type whose blocks fit the
  rows, and an aligned offset whose data lies inside the file. Nothing is allocated from a count in the file.

  Raises:
    FileNotFoundError: if `path` does not exist.
    InputError: naming the file and the first thing wrong, with its byte offset.
  """
  import gguf

  size = regular_file(path, path).st_size
  if size < HEADER_BYTES:
    raise InputError(f"{path}: not a GGUF file ({size} bytes; its header alone takes {HEADER_BYTES}).")
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    if data[:4] != b"GGUF":
      raise InputError(f"{path}: not a GGUF file (magic {show(data[:4])}, expected b'GGUF').")
    endian = "<" if struct.unpack("<I", data[4:8])[0] & 0xFFFF else ">"  # as gguf's reader guesses byte order
    cur = _Cursor(data, path, endian)
    cur.take(4, "magic")
    version = cur.number("I", "version")
    if version not in GGUF_VERSIONS:
      raise InputError(f"{path}: GGUF version {version} is not supported; qjax reads versions {GGUF_VERSIONS}.")
    n_tensors, n_kv = cur.number("Q", "tensor count"), cur.number("Q", "metadata count")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > size - HEADER_BYTES:
      raise InputError(
        f"{path}: not a readable GGUF file (its header claims {n_kv} metadata entries and {n_tensors} tensors, "
        f"more than its {size} bytes can hold)."
      )
    alignment = _walk_metadata(cur, n_kv)
    _walk_tensor_infos(cur, n_tensors, alignment, size, dict(gguf.GGML_QUANT_SIZES))


def _walk_metadata(cur: _Cursor, count: int) -> int:
  """Checks `count` metadata entries; returns ``general.alignment`` (32 when absent)."""
  keys, alignment = set(), 32
  for i in range(count):
    key = cur.string(f"metadata key {i}")
    if key in keys:
      raise cur.error(f"metadata key {show(key)} appears twice")
    keys.add(key)
    vtype = cur.number("I", f"type of {show(key)}")
    if key == "general.alignment":
      alignment = cur.number("I", key) if vtype == UINT32 else 0
      if alignment <= 0 or alignment & (alignment - 1):
        raise cur.error("general.alignment expected a power of two stored as uint32")
    else:
      cur.value(vtype, f"value of {show(key)}")
  return alignment


def _walk_tensor_infos(cur: _Cursor, count: int, alignment: int, size: int, quant_sizes: dict) -> None:
  """Checks `count` tensor infos and that every tensor's data lies, aligned, inside the file."""
  names, extents = set(), []
  for i in range(count):
    name = cur.string(f"tensor {i} name")
    if name in names:
      raise cur.error(f"tensor {show(name)} appears twice")
    names.add(name)
    n_dims = cur.number("I", f"dimension count of {show(name)}")
    if not 1 <= n_dims <= MAX_DIMS:
      raise cur.error(f"tensor {show(name)} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
    dims = [cur.number("Q", f"dimension of {show(name)}") for _ in range(n_dims)]
    raw_type = cur.number("I", f"ggml type of {show(name)}")
    offset = cur.number("Q", f"data offset of {show(name)}")
    if min(dims) < 1 or raw_type not in quant_sizes:
      raise cur.error(f"tensor {show(name)} has dimensions {dims} and ggml type {raw_type}; expected positive "
                      "dimensions and a known type")  # fmt: skip
    block, type_size = quant_sizes[raw_type]
    if dims[0] % block:
      raise cur.error(f"tensor {show(name)} has rows of {dims[0]}, not a multiple of its type's block of {block}")
    extents.append((name, offset, math.prod(dims) // block * type_size))
  start = -(-cur.pos // alignment) * alignment
  for name, offset, nbytes in extents:
    if offset % alignment or start + offset + nbytes > size:
      raise InputError(
        f"{cur.path}: not a readable GGUF file (tensor {show(name)} has data at bytes {start + offset}.."
        f"{start + offset + nbytes}, expected an offset aligned to {alignment} inside the file's {size} bytes; "
        "is it truncated?)."
      )


# ---- the checkpoint ----


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order: rotate-half pairs ``(i, i + d/2)`` become adjacent ``(2i, 2i+1)``."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `rope_permute`: back to Hugging Face's rotate-half row order."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GgufCheckpoint(Checkpoint):
  """A GGUF file (llama.cpp's container): config from metadata, tensors dequantized by `gguf`.

  Opening it walks the header (`check_gguf_header`), reports an unsupported architecture, then checks the metadata
  (sizes, head counts) against every tensor's shape; no tensor data is read until asked for.

  Raises:
    FileNotFoundError: if `path` does not exist.
    InputError: naming the file for a malformed header, another architecture, missing or invalid metadata, tensors
      that do not match it, and (when read) tensors of a type `gguf` cannot decode or holding NaN or Inf.
  """

  def __init__(self, path: str, dtype=np.float32):
    import gguf

    if not os.path.lexists(path):
      raise FileNotFoundError(f"{path}: no such GGUF file.")
    check_gguf_header(path)
    try:
      self._reader = gguf.GGUFReader(path)
    except READER_ERRORS as e:
      raise InputError(f"{path}: not a readable GGUF file ({one_line(e)}).") from e
    self.source = path
    self.dtype = np.dtype(dtype)
    self._tensors = {t.name: t for t in self._reader.tensors}
    arch = self._field("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
      raise InputError(
        f"{path}: GGUF architecture {show(arch)} is not supported; qjax reads {sorted(GGUF_ARCHITECTURES)}."
      )
    self._arch = arch
    self._permuted = GGUF_ARCHITECTURES[arch][1]
    self.config = self._config()
    self._check_tensors()
    if "rope_freqs.weight" in self._tensors:
      self.config = dataclasses.replace(self.config, rope_freq_factors=self._frequency_factors("rope_freqs.weight"))

  def _frequency_factors(self, name: str) -> tuple[float, ...]:
    """A RoPE frequency-factor tensor (``rope_freqs``, LongRoPE's), every factor checked to be positive."""
    factors = self._tensor(name)
    if (factors <= 0).any():
      raise InputError(f"{self.source}: tensor {name} expected positive frequency factors.")
    return tuple(float(f) for f in factors)

  def _field(self, key: str, default=...):
    field = self._reader.fields.get(key)
    if field is None:
      if default is ...:
        raise InputError(f"{self.source}: missing GGUF metadata key {key!r}.")
      return default
    try:
      return field.contents()
    except (IndexError, ValueError, TypeError) as e:
      raise InputError(f"{self.source}: GGUF metadata {show(key)} cannot be read ({one_line(e)}).") from e

  def _config(self) -> LlamaConfig:
    """The config the metadata describes, every value checked (types, ranges, heads that divide)."""
    a, src = self._arch, self.source
    keys = {
      "vocab_size": f"{a}.vocab_size",
      "hidden_size": f"{a}.embedding_length",
      "intermediate_size": f"{a}.feed_forward_length",
      "num_hidden_layers": f"{a}.block_count",
      "num_attention_heads": f"{a}.attention.head_count",
      "num_key_value_heads": f"{a}.attention.head_count_kv",
      "head_dim": f"{a}.attention.key_length",
    }
    other = ("context_length", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.type",
             "rope.scaling.factor", "attention.sliding_window", "rope.freq_base_swa", "rope.dimension_count",
             "rope.scaling.attn_factor", "rope.scaling.original_context_length", "expert_count",
             "expert_used_count", "expert_feed_forward_length")  # fmt: skip
    names = [*keys.values(), *(f"{a}.{k}" for k in other), "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]
    meta = {k: self._field(k) for k in names if k in self._reader.fields}
    if keys["vocab_size"] not in meta and "tokenizer.ggml.tokens" in self._reader.fields:
      meta[keys["vocab_size"]] = len(self._reader.fields["tokenizer.ggml.tokens"].data)
    family = self._gemma_fields(meta) if a == "gemma3" else self._phi3_fields(meta) if a == "phi3" else {}
    architecture = GGUF_ARCHITECTURES[a][0]
    if meta.get(f"{a}.expert_count") or a == "qwen3moe":
      family |= self._moe_fields(meta)
      architecture = MOE_ARCHITECTURES.get(a, architecture)
    return checked_config(
      meta,
      keys,
      src,
      rms_norm_eps=config_float(meta, f"{a}.attention.layer_norm_rms_epsilon", src),
      rope_theta=config_float(meta, f"{a}.rope.freq_base", src, 10000.0),
      rope_scaling=family.pop("rope_scaling", None) or self._rope_scaling(meta),
      max_position_embeddings=config_int(meta, f"{a}.context_length", src),
      tie_word_embeddings="output.weight" not in self._tensors,
      attention_bias="blk.0.attn_q.bias" in self._tensors or "blk.0.attn_qkv.bias" in self._tensors,
      architecture=architecture,
      bos_token_id=config_token_id(meta, "tokenizer.ggml.bos_token_id", src),
      eos_token_id=config_token_id(meta, "tokenizer.ggml.eos_token_id", src),
      **family,
    )

  def _moe_fields(self, meta: dict) -> dict:
    """The experts as llama.cpp runs them: ``expert_count`` of them, ``expert_used_count`` per token, their chosen
    probabilities renormalised (its llama and qwen3moe graphs always do), every layer sparse.

    Raises:
      InputError: naming the key for a missing or malformed value, or an architecture llama.cpp runs without them.
    """
    a, src = self._arch, self.source
    if a not in MOE_ARCHITECTURES:
      raise InputError(f"{src}: {a}.expert_count: llama.cpp's {a} architecture has no experts.")
    experts = expert_count(meta, f"{a}.expert_count", src)
    used = config_int(meta, f"{a}.expert_used_count", src)
    if used > experts:
      raise InputError(f"{src}: {a}.expert_used_count={used} expected at most {a}.expert_count={experts}.")
    fields = dict(num_experts=experts, num_experts_per_tok=used, norm_topk_prob=True)
    if a == "qwen3moe":
      fields["moe_intermediate_size"] = config_int(meta, f"{a}.expert_feed_forward_length", src)
    return fields

  def _gemma_fields(self, meta: dict) -> dict:
    """Gemma 3's sliding-window layers as llama.cpp reads them: the window, the pattern (a period, or a flag per
    layer; default every 6th layer global), the local RoPE base (default 10000), and the attention scale llama.cpp
    derives (1/sqrt(head_dim); the 62-layer 27B model's 1/sqrt(hidden / heads))."""
    a, src = self._arch, self.source
    layers = config_int(meta, f"{a}.block_count", src)
    key = f"{a}.attention.sliding_window_pattern"
    pattern = self._field(key, LLAMA_CPP_SWA_PATTERN)
    if isinstance(pattern, list):
      if len(pattern) != layers or not all(isinstance(p, bool) for p in pattern):
        raise InputError(f"{src}: {key} expected {layers} booleans, got {show(pattern)}.")
      types = tuple("sliding_attention" if p else "full_attention" for p in pattern)
    else:
      types = llama_cpp_layer_types(layers, config_int({key: pattern}, key, src, minimum=0))
    window = config_int(meta, f"{a}.attention.sliding_window", src, default=None)
    scalar = llama_cpp_gemma3_attention_scalar(
      layers,
      config_int(meta, f"{a}.embedding_length", src),
      config_int(meta, f"{a}.attention.head_count", src),
      config_int(meta, f"{a}.attention.key_length", src),
    )
    return dict(
      sliding_window=window,
      layer_types=types if window else None,
      rope_local_theta=config_float(meta, f"{a}.rope.freq_base_swa", src, 10000.0),
      query_pre_attn_scalar=scalar,
    )

  def _phi3_fields(self, meta: dict) -> dict:
    """Phi-3's RoPE as llama.cpp reads it: over ``rope.dimension_count`` leading dimensions of each head, LongRoPE
    when the file holds the short and long factor tensors (with ``rope.scaling.attn_factor`` and the original
    context length), and a sliding window when ``attention.sliding_window`` is not 0 (llama.cpp itself ignores it;
    transformers applies it, and so does qjax)."""
    a, src = self._arch, self.source
    heads = config_int(meta, f"{a}.attention.head_count", src)
    head_dim = config_int(meta, f"{a}.attention.key_length", src,
                          default=config_int(meta, f"{a}.embedding_length", src) // heads or 1)  # fmt: skip
    rotary = config_int(meta, f"{a}.rope.dimension_count", src, default=head_dim)
    window = config_int(meta, f"{a}.attention.sliding_window", src, default=0, minimum=0)
    partial = rotary / head_dim
    if int(head_dim * partial) != rotary:  # the factor must give back `rotary` as transformers computes it
      partial = math.nextafter(partial, math.inf)
    context = config_int(meta, f"{a}.context_length", src)
    original = config_int(meta, f"{a}.rope.scaling.original_context_length", src, default=context)
    fields = dict(partial_rotary_factor=partial, sliding_window=window or None,
                  rope_scaling=RopeScaling(original_max_position_embeddings=original))  # fmt: skip
    present = [name in self._tensors for name in (ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG)]
    if not any(present):
      return fields
    if not all(present):
      raise InputError(f"{src}: LongRoPE needs both {ROPE_FACTORS_SHORT} and {ROPE_FACTORS_LONG}; one is missing.")
    factors = {}
    for key, name in (("short_factor", ROPE_FACTORS_SHORT), ("long_factor", ROPE_FACTORS_LONG)):
      t = self._tensors[name]
      if tuple(int(d) for d in t.shape) != (rotary // 2,) or t.tensor_type.name != "F32":
        raise InputError(f"{src}: tensor {name} expected ({rotary // 2},) F32 from rope.dimension_count={rotary}.")
      factors[key] = self._frequency_factors(name)
    scaling = RopeScaling(
      rope_type="longrope",
      factor=context / original,
      original_max_position_embeddings=original,
      attention_factor=config_float(meta, f"{a}.rope.scaling.attn_factor", src, 1.0),
      **factors,
    )
    return fields | dict(rope_scaling=scaling)

  def _rope_scaling(self, meta: dict) -> RopeScaling:
    key = f"{self._arch}.rope.scaling.type"
    kind = meta.get(key, "none")
    if kind == "none":
      return RopeScaling()
    if kind != "linear":
      raise InputError(f"{self.source}: {key} expected 'none' or 'linear', got {show(kind)}.")
    return RopeScaling(rope_type="linear", factor=config_float(meta, f"{self._arch}.rope.scaling.factor", self.source))

  def _check_tensors(self) -> None:
    """Raises naming the tensor unless the tensors are exactly those the metadata implies, with their shapes, and
    of a float or quantized type (from the tensor infos; no data is read)."""
    src, config = self.source, self.config
    check_layer_count(self._tensors, config, layer=GGUF_LAYER, config_path=f"{src} metadata", source=src)
    experts = {name for i in range(config.num_hidden_layers) for name in hf_expert_tensors(config, i)}
    routers = {f"model.layers.{i}.{moe_names(config)[0]}.gate.weight" for i in range(config.num_hidden_layers)}
    expected = {_gguf_name(name, config): shape for name, shape in hf_tensor_shapes(config).items()
                if name not in experts | routers}  # fmt: skip
    for i in range(config.num_hidden_layers):
      if config.moe(i):
        shapes = {"gate": (config.num_experts, config.hidden_size)}
        shapes |= {p: (config.num_experts, *out_in) for p, out_in in expert_shapes(config).items()}
        expected |= {f"blk.{i}.{name}.weight": shapes[module.split(".")[-1]] for name, module in MOE_NAMES.items()}
    if "rope_freqs.weight" in self._tensors:
      expected["rope_freqs.weight"] = (config.head_dim // 2,)
    if config.rope_scaling.rope_type == "longrope":
      expected |= dict.fromkeys((ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG), (config.rotary_dim // 2,))
    missing = sorted(set(expected) - set(self._tensors))
    extra = sorted(set(self._tensors) - set(expected))
    if missing or extra:
      what = f"tensors missing: {missing[:5]}" if missing else f"tensors the config does not describe: {extra[:5]}"
      raise InputError(f"{src}: {what} (from its metadata: {config.num_hidden_layers} blocks).")
    for name, shape in expected.items():
      t = self._tensors[name]
      found = tuple(int(d) for d in reversed(t.shape))
      if found != shape:
        raise InputError(f"{src}: tensor {name} expected shape {shape} from the metadata, got {found}.")
      if t.tensor_type.name in INTEGER_TYPES:
        raise InputError(f"{src}: tensor {name} expected a float or quantized type, got {t.tensor_type.name}.")

  def _tensor(self, name: str) -> np.ndarray:
    """A tensor dequantized to float32 in numpy order; its shape was checked at open.

    Raises:
      InputError: naming the tensor when `gguf` cannot decode its type, or it holds NaN or Inf.
    """
    import gguf

    if name not in self._tensors:
      raise InputError(f"{self.source}: tensor {name!r} is missing.")
    t = self._tensors[name]
    try:
      values = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
      raise InputError(f"{self.source}: tensor {name} cannot be decoded ({one_line(e)}).") from e
    w = np.asarray(values, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    check_finite(name, w, self.source)
    return w

  def _hf_orientation(self, name: str) -> np.ndarray:
    """A tensor as Hugging Face stores it ([out, in] for linears), Q/K rows un-permuted."""
    w = self._tensor(name)
    if self._permuted:
      kind = re.fullmatch(r"blk\.\d+\.(attn_q|attn_k)\.(weight|bias)", name)
      if kind:
        heads = self.config.num_attention_heads if kind[1] == "attn_q" else self.config.num_key_value_heads
        w = rope_unpermute(w, heads)
    return w

  def embed_params(self) -> Params:
    return {"embedding": self._tensor("token_embd.weight").astype(self.dtype)}

  def layer_params(self, i: int) -> Params:
    params = {}
    for gguf_name, hf_module in gguf_block_names(self.config, i).items():
      path = tuple(hf_module.split("."))
      w = self._hf_orientation(f"blk.{i}.{gguf_name}.weight")
      if hf_module.endswith("norm"):
        set_nested(params, (*path, "scale"), w.astype(self.dtype))
      else:  # [out, in] -> [in, out]; stacked experts (E, out, in) -> (E, in, out)
        set_nested(params, (*path, "kernel"), np.ascontiguousarray(np.swapaxes(w, -1, -2)).astype(self.dtype))
        bias = f"blk.{i}.{gguf_name}.bias"
        if bias in self._tensors:
          set_nested(params, (*path, "bias"), self._hf_orientation(bias).astype(self.dtype))
    return split_layer(params, self.config)

  def head_params(self) -> Params:
    head = {"norm": {"scale": self._tensor("output_norm.weight").astype(self.dtype)}}
    if not self.config.tie_word_embeddings:
      head["lm_head"] = {"kernel": np.ascontiguousarray(self._tensor("output.weight").T).astype(self.dtype)}
    return head

  def tokenizer(self):
    """The tokenizer the GGUF metadata describes, built by transformers' GGUF tokenizer converters.

    `AutoTokenizer.from_pretrained(gguf_file=...)` reads the file with a reader that needs torch;
    the metadata is read here with `gguf`, so only the converters (which do not) are used.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    fields = {k: self._field(k) for k in self._reader.fields if k.startswith("tokenizer.")}
    grouped = {
      group: {name: fields[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in fields}
      for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokens = tokenizer_dict.get("tokens")
    if not isinstance(tokens, list) or not tokens:
      raise InputError(f"{self.source}: tokenizer.ggml.tokens expected a list of token strings, got {show(tokens)}.")
    if tokenizer_dict.get("tokenizer_type") == "llama":
      tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for a SentencePiece vocabulary
    for name, key in mapping._SPECIAL_TOKENS.items():
      token_id = fields.get(f"tokenizer.ggml.{key}")
      if token_id is not None and (type(token_id) is not int or not 0 <= token_id < len(tokens)):
        raise InputError(f"{self.source}: tokenizer.ggml.{key} expected a token id below {len(tokens)}, got "
                         f"{show(token_id)}.")  # fmt: skip
      tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    try:
      backend, extra = mapping.convert_gguf_tokenizer(self._arch, tokenizer_dict)
      tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    except Exception as e:  # transformers' converters and the tokenizers library raise anything on odd metadata
      raise InputError(f"{self.source}: cannot build a tokenizer from the GGUF metadata ({one_line(e)}).") from e
    return check_tokenizer(tok, self.config, self.source)


def _gguf_name(hf_name: str, config: LlamaConfig) -> str:
  """The GGUF name of a Hugging Face tensor name (``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``)."""
  fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
  if hf_name in fixed:
    return fixed[hf_name]
  _, _, i, *module, kind = hf_name.split(".")
  return f"blk.{i}.{hf_to_gguf_layer_names(config)['.'.join(module)]}.{kind}"
