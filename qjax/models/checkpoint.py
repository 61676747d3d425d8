"""Reading Llama-family checkpoints lazily: Hugging Face safetensors directories and GGUF files.

A `Checkpoint` hands out one piece of the model at a time (`embed_params`,
`layer_params(i)`, `head_params`), each read from disk only when asked, so the
calibration runner holds one decoder block at a time. `params()` assembles the whole
Flax parameter tree. Weights are read with safetensors or gguf only, never pickles.
"""

import abc
import json
import os
import re

import numpy as np
from safetensors import SafetensorError, safe_open

from qjax.models.config import LlamaConfig

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


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def hf_layer_tensors(config: LlamaConfig, i: int) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (Flax path inside the layer, transposed?) for decoder layer `i`."""
  names = {}
  for module in LAYER_MODULES:
    path = tuple(module.split("."))
    names[f"model.layers.{i}.{module}.weight"] = (*path, "kernel"), True
    has_bias = (config.attention_bias and module.split(".")[-1] in ("q_proj", "k_proj", "v_proj")) or (
      config.mlp_bias and module.startswith("mlp.")
    )
    if has_bias:
      names[f"model.layers.{i}.{module}.bias"] = (*path, "bias"), False
  for norm in LAYER_NORMS:
    names[f"model.layers.{i}.{norm}.weight"] = (norm, "scale"), False
  return names


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


def _check_tokenizer(tokenizer, config: LlamaConfig, source: str):
  if len(tokenizer) > config.vocab_size:
    raise ValueError(
      f"{source}: the tokenizer has {len(tokenizer)} tokens but the embedding has {config.vocab_size} rows; "
      "the tokenizer does not belong to this model."
    )
  return tokenizer


class SafetensorsCheckpoint(Checkpoint):
  """A Hugging Face model directory: ``config.json`` and one or more ``*.safetensors`` files.

  Args:
    model_dir: the directory.
    dtype: numpy dtype tensors are converted to (float32 by default).

  Raises:
    FileNotFoundError: naming the missing file (config, index entry, or weights).
    ValueError: naming the file for unreadable or truncated safetensors and missing tensors.
  """

  def __init__(self, model_dir: str, dtype=np.float32):
    self.source = model_dir
    self.config = LlamaConfig.from_pretrained(model_dir)
    self.dtype = np.dtype(dtype)
    self._files = self._index(model_dir)

  @staticmethod
  def _index(model_dir: str) -> dict[str, str]:
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    else:
      single = os.path.join(model_dir, "model.safetensors")
      if not os.path.exists(single):
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json.")
      files = None
      try:
        with safe_open(single, "numpy") as f:
          files = dict.fromkeys(f.keys(), single)
      except SafetensorError as e:
        raise ValueError(f"{single}: unreadable safetensors file ({e}); is it truncated?") from e
    missing = sorted({f for f in files.values() if not os.path.exists(f)})
    if missing:
      raise FileNotFoundError(f"{model_dir}: the index names missing weight files {missing}.")
    return files

  def get_many(self, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors by Hugging Face name, converted to `self.dtype`.

    Each file is opened for the call only: a file kept open stays memory-mapped, and
    every page read would count against the process for the rest of the run.
    """
    missing = [n for n in names if n not in self._files]
    if missing:
      raise ValueError(f"{self.source}: tensors {missing} are missing from the checkpoint.")
    by_file: dict[str, list[str]] = {}
    for name in names:
      by_file.setdefault(self._files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
      try:
        with safe_open(file, "numpy") as f:
          for name in file_names:
            out[name] = f.get_tensor(name).astype(self.dtype)
      except SafetensorError as e:
        raise ValueError(f"{file}: unreadable safetensors file ({e}); is it truncated?") from e
    return out

  def get(self, name: str) -> np.ndarray:
    """One tensor by its Hugging Face name, converted to `self.dtype`."""
    return self.get_many([name])[name]

  def names(self) -> list[str]:
    return sorted(self._files)

  def embed_params(self) -> Params:
    return {"embedding": self.get("model.embed_tokens.weight")}

  def layer_params(self, i: int) -> Params:
    names = hf_layer_tensors(self.config, i)
    tensors = self.get_many(list(names))
    params = {}
    for name, (path, transpose) in names.items():
      _set(params, path, np.ascontiguousarray(tensors[name].T) if transpose else tensors[name])
    return params

  def head_params(self) -> Params:
    head = {"norm": {"scale": self.get("model.norm.weight")}}
    if not self.config.tie_word_embeddings:
      head["lm_head"] = {"kernel": np.ascontiguousarray(self.get("lm_head.weight").T)}
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
      raise ValueError(f"{model_dir}: cannot load the tokenizer ({e}).") from e
    return _check_tokenizer(tok, config, model_dir)


# GGUF architecture -> (HF architecture, llama.cpp permuted the Q/K rows for its RoPE).
GGUF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

# GGUF tensor name (inside `blk.{i}.`) -> HF module name (inside `model.layers.{i}.`).
GGUF_LAYER_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order: rotate-half pairs ``(i, i + d/2)`` become adjacent ``(2i, 2i+1)``."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `rope_permute`: back to Hugging Face's rotate-half row order."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GgufCheckpoint(Checkpoint):
  """A GGUF file (llama.cpp's container): config from metadata, tensors dequantized by `gguf`.

  Raises:
    ValueError: naming the file for another architecture, missing metadata or tensors.
  """

  def __init__(self, path: str, dtype=np.float32):
    import gguf

    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such GGUF file.")
    try:
      self._reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
      raise ValueError(f"{path}: not a readable GGUF file ({e}).") from e
    self.source = path
    self.dtype = np.dtype(dtype)
    self._tensors = {t.name: t for t in self._reader.tensors}
    arch = self._field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
      raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; qjax reads {sorted(GGUF_ARCHITECTURES)}.")
    self._arch = arch
    self._permuted = GGUF_ARCHITECTURES[arch][1]
    self.config = self._config()

  def _field(self, key: str, default=...):
    field = self._reader.fields.get(key)
    if field is None:
      if default is ...:
        raise ValueError(f"{self.source}: missing GGUF metadata key {key!r}.")
      return default
    return field.contents()

  def _config(self) -> LlamaConfig:
    a = self._arch
    heads = self._field(f"{a}.attention.head_count")
    hidden = self._field(f"{a}.embedding_length")
    vocab = self._field(f"{a}.vocab_size", None) or len(self._field("tokenizer.ggml.tokens"))
    factors = None
    if "rope_freqs.weight" in self._tensors:
      factors = tuple(float(f) for f in self._tensor("rope_freqs.weight"))
    return LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=self._field(f"{a}.feed_forward_length"),
      num_hidden_layers=self._field(f"{a}.block_count"),
      num_attention_heads=heads,
      num_key_value_heads=self._field(f"{a}.attention.head_count_kv", heads),
      head_dim=self._field(f"{a}.attention.key_length", hidden // heads),
      rms_norm_eps=float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
      rope_theta=float(self._field(f"{a}.rope.freq_base", 10000.0)),
      rope_freq_factors=factors,
      max_position_embeddings=self._field(f"{a}.context_length"),
      tie_word_embeddings="output.weight" not in self._tensors,
      attention_bias="blk.0.attn_q.bias" in self._tensors,
      architecture=GGUF_ARCHITECTURES[a][0],
      bos_token_id=self._field("tokenizer.ggml.bos_token_id", None),
      eos_token_id=self._field("tokenizer.ggml.eos_token_id", None),
    )

  def _tensor(self, name: str) -> np.ndarray:
    import gguf

    if name not in self._tensors:
      raise ValueError(f"{self.source}: tensor {name!r} is missing.")
    t = self._tensors[name]
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(values, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))

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
    for gguf_name, hf_module in GGUF_LAYER_NAMES.items():
      path = tuple(hf_module.split("."))
      w = self._hf_orientation(f"blk.{i}.{gguf_name}.weight")
      if hf_module.endswith("layernorm"):
        _set(params, (*path, "scale"), w.astype(self.dtype))
      else:
        _set(params, (*path, "kernel"), np.ascontiguousarray(w.T).astype(self.dtype))
        bias = f"blk.{i}.{gguf_name}.bias"
        if bias in self._tensors:
          _set(params, (*path, "bias"), self._hf_orientation(bias).astype(self.dtype))
    return params

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
    if tokenizer_dict.get("tokenizer_type") == "llama":
      tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for a SentencePiece vocabulary
    for name, key in mapping._SPECIAL_TOKENS.items():
      token_id = fields.get(f"tokenizer.ggml.{key}")
      tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    try:
      backend, extra = mapping.convert_gguf_tokenizer(self._arch, tokenizer_dict)
    except (KeyError, ValueError, NotImplementedError) as e:
      raise ValueError(f"{self.source}: cannot build a tokenizer from the GGUF metadata ({e}).") from e
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    return _check_tokenizer(tok, self.config, self.source)
