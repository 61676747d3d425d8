"""GGUF export: a Llama-family model (dense or ggml-quantized leaves) to a file llama.cpp loads.

The file is written with llama.cpp's own `gguf` package. This module is the only place
that knows llama.cpp's conventions: tensor names, the Q/K row permutation its RoPE needs,
metadata key types, and how a tokenizer is described. Files are written to a temporary
path beside the target and renamed when complete, so an interrupted write leaves nothing.
"""

import functools
import hashlib
import json
import pathlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import gguf
import numpy as np

from qjax.core import QArray, is_qarray
from qjax.core import ggml as ggml_types
from qjax.core.tree import leaves_with_paths
from qjax.formats.gguf_pretokenizers import CHECK_TEXT, PRE_TOKENIZERS
from qjax.formats.gguf_reader import (
  ROPE_FACTORS_LONG,
  ROPE_FACTORS_SHORT,
  hf_to_gguf_layer_names,
  llama_cpp_gemma3_attention_scalar,
  llama_cpp_layer_types,
  rope_permute,
)
from qjax.formats.output import atomic_file, check_file_output
from qjax.formats.shards import Spill, as_parts
from qjax.models.config import LlamaConfig
from qjax.models.fused import fuse_params

GGUF_ARCH = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "llama",
  "Qwen2ForCausalLM": "qwen2",
  "Qwen3ForCausalLM": "qwen3",
  "Gemma3ForCausalLM": "gemma3",
  "Phi3ForCausalLM": "phi3",
  "MixtralForCausalLM": "llama",
  "Qwen3MoeForCausalLM": "qwen3moe",
}
FLOAT_TYPES = ("F32", "F16", "BF16")
"""The float storage types of a GGUF tensor qjax writes (BF16 goes through `gguf.quants`)."""

# llama_ftype values for `general.file_type` (a label; llama.cpp loads any mixture).
FILE_TYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25,
    "IQ4_XS": 30, "BF16": 32,
}  # fmt: skip

QUANTIZED_BY = "general.quantized_by"


class KeyValue(NamedTuple):
  """One GGUF metadata entry with its exact type (llama.cpp is strict about types)."""

  key: str
  value: Any
  type: gguf.GGUFValueType
  sub_type: gguf.GGUFValueType | None = None


def gguf_tensor_name(path: str, config: LlamaConfig) -> str:
  """GGUF name of a Flax parameter path, e.g. ``model/layers_3/mlp/down_proj/kernel`` -> ``blk.3.ffn_down.weight``.

  Raises:
    ValueError: for a path that has no GGUF counterpart.
  """
  parts = path.split("/")
  if path == "model/embed_tokens/embedding":
    return "token_embd.weight"
  if path == "model/norm/scale":
    return "output_norm.weight"
  if path == "lm_head/kernel":
    return "output.weight"
  if len(parts) >= 3 and parts[0] == "model" and parts[1].startswith("layers_"):
    layer = parts[1].removeprefix("layers_")
    module = ".".join(parts[2:-1])
    kind = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(parts[-1])
    hf_to_gguf = hf_to_gguf_layer_names(config)
    if module in hf_to_gguf and kind:
      return f"blk.{layer}.{hf_to_gguf[module]}.{kind}"
  raise ValueError(f"parameter {path!r} has no GGUF tensor name.")


def _pre_tokenizer(tokenizer) -> str:
  digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
  if digest not in PRE_TOKENIZERS:
    raise ValueError(
      f"the tokenizer's pre-tokenizer is not one llama.cpp knows (hash {digest[:16]}…); it cannot be expressed in GGUF."
    )
  return PRE_TOKENIZERS[digest]


def _tokenizer_kind(tokenizer) -> str:
  backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
  if backend is None:
    raise ValueError("only fast (tokenizers-backed) tokenizers can be written to GGUF.")
  model = backend.model
  name = type(model).__name__
  if name == "BPE":
    return "llama" if getattr(model, "byte_fallback", False) else "gpt2"
  raise ValueError(f"a {name} tokenizer cannot be expressed in GGUF (llama.cpp reads BPE and SentencePiece-BPE).")


def tokenizer_metadata(tokenizer, vocab_size: int) -> list[KeyValue]:
  """GGUF ``tokenizer.*`` entries for a Hugging Face fast tokenizer, as llama.cpp's converter writes them.

  Byte-level BPE (GPT-2 style, Llama 3, SmolLM, Qwen2) becomes ``tokenizer.ggml.model = "gpt2"``
  with merges and the pre-tokenizer name; SentencePiece-style BPE with byte fallback
  (Llama 2, Mistral) becomes ``"llama"`` with scores.

  Raises:
    ValueError: for tokenizers GGUF cannot express (Unigram, unknown pre-tokenizer, slow tokenizers).
  """
  kind = _tokenizer_kind(tokenizer)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    if kind == "gpt2":
      tokens, types = _bpe_vocab(tokenizer, vocab_size)
      entries = [
        KeyValue("tokenizer.ggml.model", "gpt2", gguf.GGUFValueType.STRING),
        KeyValue("tokenizer.ggml.pre", _pre_tokenizer(tokenizer), gguf.GGUFValueType.STRING),
      ]
      scores = None
    else:
      vocab = gguf.LlamaHfVocab(pathlib.Path(tmp))
      merge_scores = _merge_scores(tokenizer)
      tokens, scores, types = [], [], []
      for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        # gguf's LlamaHfVocab scores every token -1000; llama.cpp's SentencePiece tokenizer merges the
        # highest-scoring pair first, so score each merge product by its BPE rank.
        normal = toktype == gguf.TokenType.NORMAL
        scores.append(merge_scores.get(text.decode("utf-8", "replace"), 0.0) if normal else float(score))
        types.append(int(toktype))
      for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
      entries = [
        KeyValue("tokenizer.ggml.model", "llama", gguf.GGUFValueType.STRING),
        KeyValue("tokenizer.ggml.pre", "default", gguf.GGUFValueType.STRING),
      ]
      if not _adds_space_prefix(tokenizer):  # Gemma: llama.cpp's SentencePiece tokenizer would prepend one
        entries.append(KeyValue("tokenizer.ggml.add_space_prefix", False, gguf.GGUFValueType.BOOL))
    entries += [
      KeyValue("tokenizer.ggml.tokens", tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
      KeyValue("tokenizer.ggml.token_type", types, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
    ]
    if scores is not None:
      entries.append(KeyValue("tokenizer.ggml.scores", scores, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32))
    entries += _special_vocab(tmp, vocab_size, load_merges=kind == "gpt2")
  return entries


def _adds_space_prefix(tokenizer) -> bool:
  """Whether a SentencePiece-style tokenizer turns a text's first word into ``▁word`` (Llama 2) or not (Gemma)."""
  pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
  return bool(pieces) and pieces[0].startswith("\u2581")


def _merge_scores(tokenizer) -> dict[str, float]:
  """``-rank`` of the BPE merge that produces each token (tokens no merge produces are absent)."""
  model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
  scores = {}
  for rank, merge in enumerate(model.get("merges", [])):
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    scores.setdefault(left + right, -float(rank))
  return scores


def _bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
  vocab = tokenizer.get_vocab()
  if max(vocab.values()) >= vocab_size:
    raise ValueError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the embedding's {vocab_size} rows.")
  reverse = {i: t for t, i in vocab.items()}
  added = tokenizer.added_tokens_decoder
  tokens, types = [], []
  for i in range(vocab_size):
    if i not in reverse:
      tokens.append(f"[PAD{i}]")
      types.append(int(gguf.TokenType.UNUSED))
      continue
    tokens.append(reverse[i])
    if i in added:
      types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
    else:
      types.append(int(gguf.TokenType.NORMAL))
  return tokens, types


class _Collector:
  """Stands in for a GGUFWriter to capture what `gguf.SpecialVocab.add_to_gguf` would write: it calls the writer's
  own methods (so the keys are the writer's, e.g. ``tokenizer.ggml.padding_token_id``, which llama.cpp reads),
  whose values all end in ``add_key_value``, recorded here."""

  def __init__(self):
    self.entries: list[KeyValue] = []

  def add_key_value(self, key: str, value: Any, vtype: gguf.GGUFValueType, sub_type=None) -> None:
    self.entries.append(KeyValue(key, value, vtype, sub_type))

  def __getattr__(self, name: str) -> Callable:
    method = getattr(gguf.GGUFWriter, name, None) if name.startswith("add_") else None
    if method is None:
      raise AttributeError(name)
    return functools.partial(method, self)


def _special_vocab(tokenizer_dir: str, vocab_size: int, *, load_merges: bool) -> list[KeyValue]:
  special = gguf.SpecialVocab(tokenizer_dir, load_merges=load_merges, n_vocab=vocab_size)
  collector = _Collector()
  special.add_to_gguf(collector, quiet=True)
  return collector.entries


def model_metadata(config: LlamaConfig, *, file_type: str, name: str, description: str = "") -> list[KeyValue]:
  """``general.*`` and ``{arch}.*`` entries with the types llama.cpp's loader expects."""
  from qjax import __version__

  arch = GGUF_ARCH[config.architecture]
  u32, f32, string = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
  entries = [
    KeyValue("general.name", name, string),
    KeyValue(QUANTIZED_BY, f"qjax {__version__}" + (f": {description}" if description else ""), string),
    KeyValue("general.file_type", FILE_TYPES[file_type], u32),
    KeyValue("general.quantization_version", gguf.GGML_QUANT_VERSION, u32),
    KeyValue(f"{arch}.context_length", config.max_position_embeddings, u32),
    KeyValue(f"{arch}.embedding_length", config.hidden_size, u32),
    KeyValue(f"{arch}.block_count", config.num_hidden_layers, u32),
    KeyValue(f"{arch}.feed_forward_length", config.intermediate_size, u32),
    KeyValue(f"{arch}.attention.head_count", config.num_attention_heads, u32),
    KeyValue(f"{arch}.attention.head_count_kv", config.num_key_value_heads, u32),
    KeyValue(f"{arch}.rope.freq_base", config.rope_theta, f32),
    KeyValue(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps, f32),
  ]
  if arch == "phi3":
    entries += _phi3_metadata(config)
  else:  # the converter's phi3 writes no head sizes: llama.cpp derives them as hidden / heads
    entries += [
      KeyValue(f"{arch}.attention.key_length", config.head_dim, u32),
      KeyValue(f"{arch}.attention.value_length", config.head_dim, u32),
    ]
  if arch == "llama":  # what convert_hf_to_gguf.py adds for the llama architecture only
    entries += [
      KeyValue(f"{arch}.vocab_size", config.vocab_size, u32),
      KeyValue(f"{arch}.rope.dimension_count", config.head_dim, u32),
    ]
  if config.rope_scaling.rope_type == "linear":
    entries += [
      KeyValue(f"{arch}.rope.scaling.type", "linear", string),
      KeyValue(f"{arch}.rope.scaling.factor", config.rope_scaling.factor, f32),
    ]
  if config.num_experts:
    entries += _moe_metadata(config, arch)
  if arch == "gemma3":
    entries += _gemma3_metadata(config)
  elif config.sliding_window is not None and arch != "phi3":
    raise NotImplementedError(f"llama.cpp's {arch} architecture has no sliding window; this model cannot be exported.")
  return entries


def _moe_metadata(config: LlamaConfig, arch: str) -> list[KeyValue]:
  """The experts' keys convert_hf_to_gguf.py writes (Qwen3-MoE: with the width of one expert).

  Raises:
    NotImplementedError: for what llama.cpp's graphs cannot run: dense layers between sparse ones, or the chosen
      probabilities left unnormalised (its llama and qwen3moe graphs renormalise them).
  """
  if config.dense_layers:
    raise NotImplementedError(
      f"llama.cpp's {arch} runs every layer sparse; layers {list(config.dense_layers)} of this model are dense "
      "(mlp_only_layers, decoder_sparse_step), so it cannot be written to GGUF."
    )
  if not config.norm_topk_prob:
    raise NotImplementedError(
      f"llama.cpp's {arch} renormalises the top-k routing probabilities; this model leaves them unnormalised "
      "(norm_topk_prob=False), so it cannot be written to GGUF."
    )
  u32 = gguf.GGUFValueType.UINT32
  entries = [
    KeyValue(f"{arch}.expert_count", config.num_experts, u32),
    KeyValue(f"{arch}.expert_used_count", config.num_experts_per_tok, u32),
  ]
  if arch == "qwen3moe":
    entries.append(KeyValue(f"{arch}.expert_feed_forward_length", config.expert_size, u32))
  return entries


def _gemma3_metadata(config: LlamaConfig) -> list[KeyValue]:
  """The sliding-window keys convert_hf_to_gguf.py writes for Gemma 3, and the layer pattern when it is not the
  every-6th-layer-global that llama.cpp assumes without one (the converter omits it; llama.cpp would misread such a
  model).

  Raises:
    NotImplementedError: for an attention scale llama.cpp cannot be told (it derives it from the shapes).
  """
  derived = llama_cpp_gemma3_attention_scalar(
    config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.head_dim
  )
  if config.attention_scale != derived**-0.5:
    raise NotImplementedError(
      f"llama.cpp derives Gemma 3's attention scale from head_dim={derived}; query_pre_attn_scalar="
      f"{config.query_pre_attn_scalar} cannot be written to GGUF."
    )
  entries = [
    KeyValue("gemma3.rope.freq_base_swa", config.rope_local_theta or config.rope_theta, gguf.GGUFValueType.FLOAT32)
  ]
  if config.sliding_window is None:
    return entries
  entries.append(KeyValue("gemma3.attention.sliding_window", config.sliding_window, gguf.GGUFValueType.UINT32))
  types = config.layer_types or ("sliding_attention",) * config.num_hidden_layers
  if types != llama_cpp_layer_types(config.num_hidden_layers):
    flags = [t == "sliding_attention" for t in types]
    entries.append(
      KeyValue("gemma3.attention.sliding_window_pattern", flags, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
    )
  return entries


def _phi3_metadata(config: LlamaConfig) -> list[KeyValue]:
  """What convert_hf_to_gguf.py writes for Phi-3: the rotated dimensions, the sliding window (0 for none; llama.cpp
  reads but ignores it) and, for LongRoPE, the original context length and the attention factor.

  Raises:
    NotImplementedError: for a head size other than hidden / heads (llama.cpp's phi3 derives it so).
  """
  if config.head_dim * config.num_attention_heads != config.hidden_size:
    raise NotImplementedError(
      f"llama.cpp's phi3 derives head_dim as hidden_size / num_attention_heads; head_dim={config.head_dim} cannot "
      "be written to GGUF."
    )
  u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
  scaling = config.rope_scaling
  entries = [
    KeyValue("phi3.rope.scaling.original_context_length", scaling.original_max_position_embeddings, u32),
    KeyValue("phi3.rope.dimension_count", config.rotary_dim, u32),
    KeyValue("phi3.attention.sliding_window", config.sliding_window or 0, u32),
  ]
  if scaling.rope_type == "longrope":
    entries.append(KeyValue("phi3.rope.scaling.attn_factor", scaling.attention_factor, f32))
  elif scaling.rope_type != "default":
    raise NotImplementedError(f"llama.cpp's phi3 reads LongRoPE only; rope type {scaling.rope_type!r} cannot be "
                              "written to GGUF.")  # fmt: skip
  return entries


def rope_factors(config: LlamaConfig) -> np.ndarray | None:
  """The ``rope_freqs.weight`` tensor llama.cpp uses for Llama-3 style frequency scaling, if any."""
  from qjax.models.llama import rope_frequencies

  if config.rope_freq_factors is not None:
    return np.asarray(config.rope_freq_factors, np.float32)
  if config.rope_scaling.rope_type != "llama3":
    return None
  plain = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.int64) / config.head_dim))
  return (plain.astype(np.float32) / rope_frequencies(config)).astype(np.float32)


class GgufTensor(NamedTuple):
  """A tensor ready for the writer: numpy data in Hugging Face orientation and its ggml type."""

  name: str
  data: np.ndarray  # float: [out, in] (or 1-D); quantized: uint8 [rows, bytes_per_row]
  type_name: str


def _to_gguf_orientation(config: LlamaConfig, name: str, leaf, float_type: str) -> GgufTensor:
  """Flax leaf -> GGUF tensor: transpose kernels to [out, in], permute Q/K rows, encode floats."""
  permute_heads = None
  if GGUF_ARCH[config.architecture] == "llama":
    if ".attn_q." in name:
      permute_heads = config.num_attention_heads
    elif ".attn_k." in name:
      permute_heads = config.num_key_value_heads
  if is_qarray(leaf):
    return _quantized_tensor(name, leaf, permute_heads)
  w = np.asarray(leaf, np.float32)
  if w.ndim >= 2 and name != "token_embd.weight":
    w = np.swapaxes(w, -1, -2)  # Flax kernel [in, out] -> [out, in]; stacked experts (E, in, out) -> (E, out, in)
  if permute_heads:
    w = rope_permute(w, permute_heads)
  type_name = "F32" if w.ndim == 1 or ".ffn_gate_inp." in name else float_type  # the router stays F32, as llama.cpp
  return GgufTensor(name, np.ascontiguousarray(w), type_name)


def _quantized_tensor(name: str, q: QArray, permute_heads: int | None) -> GgufTensor:
  if not q.spec.is_ggml:
    raise ValueError(
      f"{name}: a {q.spec.bits}-bit packed QArray has no GGUF block type; quantize with a GGUF recipe "
      "(--export=gguf:TYPE re-encodes dense weights), or convert with `qjax convert`."
    )
  rows = np.asarray(q.codes)
  if permute_heads:
    rows = rope_permute(rows, permute_heads)  # whole rows move; every block lies inside one row
  return GgufTensor(name, np.ascontiguousarray(rows), q.spec.layout)


def gguf_tensors(config: LlamaConfig, params, *, float_type: str = "F32") -> Iterator[GgufTensor]:
  """The model's tensors in llama.cpp's order and layout.

  Args:
    config: the model config.
    params: the Flax parameter tree, or a stream of its parts in model order (the embedding, each decoder block, the
      head: full-path subtrees, consumed one at a time); leaves dense or ggml-layout `QArray`s.
    float_type: "F32", "F16" or "BF16" for dense 2-D leaves (1-D leaves are always F32).
  """
  if float_type not in FLOAT_TYPES:
    raise ValueError(f"`gguf_tensors` expected float_type in {FLOAT_TYPES}, got {float_type!r}.")
  factors = rope_factors(config)
  if factors is not None:
    yield GgufTensor("rope_freqs.weight", factors, "F32")
  if config.rope_scaling.rope_type == "longrope":
    yield GgufTensor(ROPE_FACTORS_LONG, np.asarray(config.rope_scaling.long_factor, np.float32), "F32")
    yield GgufTensor(ROPE_FACTORS_SHORT, np.asarray(config.rope_scaling.short_factor, np.float32), "F32")
  for part in as_parts(params):
    leaves = dict(leaves_with_paths(fuse_params(part, config)))
    order = [p for p in ["model/embed_tokens/embedding"] if p in leaves]
    for i in range(config.num_hidden_layers):
      order += sorted(p for p in leaves if p.startswith(f"model/layers_{i}/"))
    order += [p for p in ("model/norm/scale", "lm_head/kernel") if p in leaves]
    del part
    for path in order:
      yield _to_gguf_orientation(config, gguf_tensor_name(path, config), leaves.pop(path), float_type)
    for path in leaves:  # a leaf outside the model's parts: named (and refused) as llama.cpp's converter would
      gguf_tensor_name(path, config)


def _encoded(tensor: GgufTensor) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
  """A tensor's bytes as the file stores them, and its ggml type when numpy's dtype does not say it."""
  if tensor.type_name == "F32":
    return np.asarray(tensor.data, np.float32), None
  if tensor.type_name == "F16":
    return np.asarray(tensor.data, np.float16), None
  if tensor.type_name == "BF16":
    bf16 = gguf.GGMLQuantizationType.BF16
    return gguf.quants.quantize(tensor.data.astype(np.float32), bf16), bf16
  return tensor.data, gguf.GGMLQuantizationType(ggml_types.BLOCK_TYPES[tensor.type_name].type_id)


def write_gguf(
  path: str,
  config: LlamaConfig,
  params,
  tokenizer_entries: list[KeyValue],
  *,
  float_type: str = "F32",
  file_type: str | None = None,
  name: str = "qjax",
  description: str = "",
  overwrite: bool = False,
) -> None:
  """Writes a GGUF file llama.cpp loads, a tensor at a time (`qjax.formats.shards`).

  Args:
    path: the output file; written to a temporary file in the same directory and renamed. An existing file is
      replaced only if qjax wrote it and `overwrite` is set.
    config: the model config.
    params: Flax parameter tree (dense leaves, or ggml-layout `QArray`s for quantized tensors), or a stream of its
      parts in model order (see `gguf_tensors`).
    tokenizer_entries: the ``tokenizer.*`` metadata (see `tokenizer_metadata`).
    float_type: storage of dense 2-D tensors: "F32", "F16" or "BF16".
    file_type: the recipe name for ``general.file_type`` (defaults to `float_type`).
    name: ``general.name``.
    description: how the file was made, after qjax's version in ``general.quantized_by``.
    overwrite: replace a GGUF file qjax wrote before.

  Raises:
    FileNotFoundError: if the output directory does not exist.
    InputError: if `path` exists and may not be replaced.
    ValueError: for leaves with no GGUF name or no GGUF type.
  """
  # First: what llama.cpp cannot be told about the model is refused before any tensor is encoded.
  metadata = model_metadata(config, file_type=file_type or float_type, name=name, description=description)
  check_file_output(path, overwrite=overwrite, is_ours=written_by_qjax)
  with atomic_file(path) as tmp:
    spill = Spill(tmp + ".spill")
    try:
      types = {}
      for tensor in gguf_tensors(config, params, float_type=float_type):
        data, types[tensor.name] = _encoded(tensor)
        spill.add(tensor.name, data)
        del tensor, data
      writer = gguf.GGUFWriter(tmp, GGUF_ARCH[config.architecture])
      try:
        for entry in metadata + tokenizer_entries:
          writer.add_key_value(entry.key, entry.value, entry.type, entry.sub_type)
        for e in spill.entries.values():
          writer.add_tensor_info(e.name, e.shape, e.dtype, e.nbytes, raw_dtype=types[e.name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in spill.entries.values():
          writer.write_tensor_data(spill.read(e.name))
      finally:
        writer.close()
    finally:
      spill.close()


def written_by_qjax(path: str) -> bool:
  """Whether the GGUF file at `path` says qjax wrote it (``general.quantized_by``), from its first megabyte."""
  try:
    with open(path, "rb") as f:
      head = f.read(1 << 20)
  except OSError:
    return False
  key = QUANTIZED_BY.encode()
  at = head.find(key)
  return head.startswith(b"GGUF") and at >= 0 and b"qjax " in head[at + len(key) : at + len(key) + 32]
