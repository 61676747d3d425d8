"""`LlamaConfig`: the hyperparameters of the decoder-only Llama family, as Hugging Face defines them."""

import dataclasses
import json
import math
import os
from typing import Any, Literal

from qjax.core.errors import InputError
from qjax.core.files import one_line, read_bounded

# Hugging Face architecture name -> its model_type and what differs from plain Llama.
ARCHITECTURES = {
  "LlamaForCausalLM": {"model_type": "llama"},
  "MistralForCausalLM": {"model_type": "mistral"},
  "Qwen2ForCausalLM": {"model_type": "qwen2", "attention_bias": True},
  "Qwen3ForCausalLM": {"model_type": "qwen3", "qk_norm": True},  # RMSNorm over each head's queries and keys
  # Gemma 3: GeGLU, embeddings scaled by sqrt(hidden), norms after attention and the MLP too, norm weights stored
  # as w and applied as 1 + w, sliding-window and global layers with their own RoPE bases.
  "Gemma3ForCausalLM": {"model_type": "gemma3_text", "qk_norm": True, "gemma": True},
  # Phi-3 (and Phi-4-mini): checkpoints fuse q/k/v into qkv_proj and gate/up into gate_up_proj (`qjax.models.fused`);
  # LongRoPE, and RoPE over a leading fraction of each head.
  "Phi3ForCausalLM": {"model_type": "phi3", "fused_projections": True},
  # Mixtures of experts: a routed set of SwiGLU experts in place of the MLP (`qjax.models.moe`). Mixtral: softmax
  # top-k with the chosen probabilities renormalised, every layer sparse; checkpoints name the experts w1/w2/w3.
  "MixtralForCausalLM": {"model_type": "mixtral", "moe": True},
  # Qwen3-MoE: Qwen3's attention; renormalising the top-k probabilities is optional (`norm_topk_prob`), and layers
  # may stay dense (`mlp_only_layers`, `decoder_sparse_step`).
  "Qwen3MoeForCausalLM": {"model_type": "qwen3_moe", "qk_norm": True, "moe": True},
}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# The `RopeScaling` fields each type writes to a Hugging Face config.
ROPE_KEYS = {
  "linear": ("factor",),
  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
  "longrope": ("short_factor", "long_factor", "factor", "attention_factor", "original_max_position_embeddings"),
}
# Architectures whose configs have no use_sliding_window: a sliding_window given applies.
SLIDING_BY_DEFAULT = ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM")
LAYER_TYPES = ("full_attention", "sliding_attention")
MAX_SIZE = 2**31  # every size, count and token id a config gives must lie below it
MAX_JSON_BYTES = 64 << 20  # config.json, an index or a manifest: megabytes at most; refused before parsing
REQUIRED = object()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling (``rope_scaling`` / ``rope_parameters`` in a HF config).

  Attributes:
    rope_type: ``"default"`` (none), ``"linear"`` (positions divided by `factor`),
      ``"llama3"`` (Llama 3.1's wavelength-dependent scaling of the frequencies) or ``"longrope"`` (Phi-3: each
      frequency divided by `short_factor`, or by `long_factor` when a forward pass reaches beyond
      `original_max_position_embeddings`; cos and sin multiplied by `attention_factor`).
  """

  rope_type: Literal["default", "linear", "llama3", "longrope"] = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  short_factor: tuple[float, ...] | None = None
  long_factor: tuple[float, ...] | None = None
  attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hyperparameters of a Llama-family decoder (Llama 1-3, Mistral, Qwen2, Qwen3, SmolLM, Gemma 3, Phi-3).

  Hashable, so a model built from it can be a static argument under jit.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors, as GGUF's rope_freqs tensor
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES; None: `sliding_window` applies to all
  rope_local_theta: float | None = None  # RoPE base of sliding-window layers when it differs (Gemma 3)
  query_pre_attn_scalar: int | None = None  # attention scores are scaled by its -1/2 power (default: head_dim)
  partial_rotary_factor: float = 1.0  # RoPE rotates the first int(head_dim * factor) dimensions of each head
  num_experts: int = 0  # experts of each sparse layer; 0: every layer is a dense MLP
  num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
  moe_intermediate_size: int | None = None  # width of one expert (default: intermediate_size)
  norm_topk_prob: bool = True  # the k chosen routing probabilities are renormalised to sum to one
  dense_layers: tuple[int, ...] = ()  # layers with a dense MLP of intermediate_size in a mixture-of-experts model
  architecture: str = "LlamaForCausalLM"
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"unsupported architecture {self.architecture!r}; qjax supports {sorted(ARCHITECTURES)}.")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} must be a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}."
      )
    if self.rope_scaling.rope_type not in ROPE_TYPES:
      raise NotImplementedError(f"rope type {self.rope_scaling.rope_type!r} is not supported; qjax has {ROPE_TYPES}.")
    if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
      raise ValueError(
        f"partial_rotary_factor={self.partial_rotary_factor} of head_dim={self.head_dim} expected a positive even "
        f"number of rotated dimensions, got {self.rotary_dim}."
      )
    if self.rope_scaling.rope_type == "longrope":
      for key in ("short_factor", "long_factor"):
        factors = getattr(self.rope_scaling, key)
        if factors is None or len(factors) != self.rotary_dim // 2:
          raise ValueError(f"rope_scaling.{key} expected {self.rotary_dim // 2} factors, got {show(factors)}.")
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ValueError(
        f"num_experts_per_tok expected 1 .. num_experts={self.num_experts}, got {self.num_experts_per_tok}."
      )
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
        raise ValueError(
          f"layer_types expected {self.num_hidden_layers} entries of {LAYER_TYPES}, got {show(self.layer_types)}."
        )

  @property
  def model_type(self) -> str:
    return ARCHITECTURES[self.architecture]["model_type"]

  @property
  def qk_norm(self) -> bool:
    """Whether queries and keys pass an RMSNorm over each head (``q_norm``, ``k_norm``; Qwen3) before RoPE."""
    return ARCHITECTURES[self.architecture].get("qk_norm", False)

  @property
  def gemma(self) -> bool:
    """Gemma 3's block: GeGLU (tanh GELU), embeddings scaled by sqrt(hidden_size), an RMSNorm on the attention and
    MLP outputs too (``post_attention_layernorm``, ``post_feedforward_layernorm``; the MLP reads
    ``pre_feedforward_layernorm``), and norm weights that checkpoints store as ``w`` for a multiplier ``1 + w``."""
    return ARCHITECTURES[self.architecture].get("gemma", False)

  @property
  def norm_offset(self) -> float:
    """What a Hugging Face checkpoint's norm weight is short of the multiplier the norm applies (qjax's value)."""
    return 1.0 if self.gemma else 0.0

  @property
  def embed_scale(self) -> float:
    """The factor token embeddings are multiplied by on the way in (not on the tied head)."""
    return math.sqrt(self.hidden_size) if self.gemma else 1.0

  @property
  def fused_projections(self) -> bool:
    """Whether checkpoints store q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (Phi-3)."""
    return ARCHITECTURES[self.architecture].get("fused_projections", False)

  @property
  def rotary_dim(self) -> int:
    """How many leading dimensions of each head RoPE rotates (all, unless `partial_rotary_factor` < 1)."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def expert_size(self) -> int:
    """The intermediate width of one expert."""
    return self.moe_intermediate_size or self.intermediate_size

  def moe(self, i: int) -> bool:
    """Whether layer `i` routes its tokens to experts (else it has a dense MLP)."""
    return self.num_experts > 0 and i not in self.dense_layers

  def sliding(self, i: int) -> bool:
    """Whether layer `i` attends within `sliding_window` tokens only."""
    if self.sliding_window is None:
      return False
    return self.layer_types is None or self.layer_types[i] == "sliding_attention"

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> "LlamaConfig":
    """Builds a config from a Hugging Face ``config.json`` dictionary, checking every value it uses.

    Raises:
      InputError: naming `source` and the key when the architecture is unsupported, a key is missing, or a value
        has the wrong type or range (sizes are positive integers below 2**31, heads divide evenly).
    """
    if not isinstance(hf, dict):
      raise InputError(f"{source}: expected a JSON object, got {type(hf).__name__}.")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
      raise InputError(f"{source}: architectures expected a list of names, got {show(archs)}.")
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs:  # a config saved without its architectures, as transformers reads it: by type
      arch = next((a for a, v in ARCHITECTURES.items() if v["model_type"] == hf.get("model_type")), None)
    if arch is None:
      found = archs or hf.get("model_type")
      raise InputError(f"{source}: unsupported architecture {show(found)}; qjax supports {sorted(ARCHITECTURES)}.")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
      raise InputError(f"{source}: rope_scaling expected an object, got {show(rope)}.")
    sliding = None
    if config_bool(hf, "use_sliding_window", source, default=arch in SLIDING_BY_DEFAULT):
      sliding = config_int(hf, "sliding_window", source, default=None)
    factors = hf.get("qjax_rope_freq_factors")
    fields = dict(
      architecture=arch,
      rope_theta=config_float(hf, "rope_theta", source, default=config_float(rope, "rope_theta", source, 10000.0)),
      rms_norm_eps=config_float(hf, "rms_norm_eps", source, default=1e-6),
      max_position_embeddings=config_int(hf, "max_position_embeddings", source, default=4096),
      tie_word_embeddings=config_bool(hf, "tie_word_embeddings", source, default=False),
      attention_bias=config_bool(hf, "attention_bias", source, ARCHITECTURES[arch].get("attention_bias", False)),
      mlp_bias=config_bool(hf, "mlp_bias", source, default=False),
      sliding_window=sliding,
      rope_freq_factors=float_list(factors, "qjax_rope_freq_factors", source) if factors else None,
      bos_token_id=token_id(hf, "bos_token_id", source),
      eos_token_id=token_id(hf, "eos_token_id", source),
    )
    if ARCHITECTURES[arch].get("gemma"):
      fields.update(gemma_fields(hf, source))
    elif arch == "Phi3ForCausalLM":
      fields.update(phi3_fields(hf, source))
    else:
      fields["rope_scaling"] = rope_scaling(rope, source)
    if ARCHITECTURES[arch].get("moe"):
      fields.update(moe_fields(hf, arch, source))
    if fields["rope_scaling"].rope_type == "longrope" and arch != "Phi3ForCausalLM":
      raise InputError(f"{source}: rope_scaling.rope_type 'longrope' is supported for Phi3ForCausalLM only.")
    keys = {"num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim"}
    return checked_config(hf, keys | {f: f for f in SIZE_FIELDS}, source, **fields)

  @classmethod
  def from_pretrained(cls, model_dir: str) -> "LlamaConfig":
    """Reads ``config.json`` from a Hugging Face model directory.

    Raises:
      FileNotFoundError: if there is no ``config.json``.
      InputError: naming ``config.json`` when it is not a regular file, too large, not JSON, or not a valid config.
    """
    path = os.path.join(model_dir, "config.json")
    if not os.path.lexists(path):
      raise FileNotFoundError(f"{path}: no config.json; is {model_dir!r} a Hugging Face model directory?")
    return cls.from_hf_dict(read_json(path), source=path)

  def to_hf_dict(self) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dictionary of this config."""
    rope = None
    if self.rope_scaling.rope_type != "default":
      keys = ROPE_KEYS[self.rope_scaling.rope_type]
      rope = {"rope_type": self.rope_scaling.rope_type, **{k: getattr(self.rope_scaling, k) for k in keys}}
      rope = {k: list(v) if isinstance(v, tuple) else v for k, v in rope.items()}
    hf = {
      "architectures": [self.architecture],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_hidden_layers,
      "num_attention_heads": self.num_attention_heads,
      "num_key_value_heads": self.num_key_value_heads,
      "head_dim": self.head_dim,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": rope,
      "max_position_embeddings": self.max_position_embeddings,
      "tie_word_embeddings": self.tie_word_embeddings,
      "hidden_act": "silu",
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id,
    }
    if self.architecture == "LlamaForCausalLM":
      hf.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
    if self.architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
      hf.update(attention_bias=self.attention_bias, use_sliding_window=False)
    if self.gemma:  # the keys every transformers version reads (v5 turns them into rope_parameters)
      del hf["hidden_act"]
      hf.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=self.query_pre_attn_scalar,
                sliding_window=self.sliding_window, layer_types=list(self.layer_types or ()),
                rope_local_base_freq=self.rope_local_theta, attention_bias=self.attention_bias,
                final_logit_softcapping=None, attn_logit_softcapping=None)  # fmt: skip
      return hf
    if self.architecture == "Phi3ForCausalLM":
      hf.update(partial_rotary_factor=self.partial_rotary_factor, sliding_window=self.sliding_window,
                original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)  # fmt: skip
      if rope is not None:  # Phi3Config reads the original length from the top level
        rope.pop("original_max_position_embeddings")
      return hf
    if self.num_experts:
      hf.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
    if self.architecture == "Qwen3MoeForCausalLM":
      hf.update(num_experts=self.num_experts, moe_intermediate_size=self.expert_size,
                norm_topk_prob=self.norm_topk_prob, mlp_only_layers=list(self.dense_layers),
                decoder_sparse_step=1)  # fmt: skip
    if self.rope_freq_factors is not None:
      hf["qjax_rope_freq_factors"] = list(self.rope_freq_factors)  # no Hugging Face key holds explicit factors
    if self.sliding_window is not None:
      hf.update(sliding_window=self.sliding_window, use_sliding_window=True)
    return hf


def gemma_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """The `LlamaConfig` fields of a Gemma 3 text config (``Gemma3TextConfig``), with its defaults.

  RoPE comes as transformers 5 writes it (``rope_parameters`` per layer type) or as older versions do
  (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``); layers follow ``layer_types`` or, in older configs,
  ``sliding_window_pattern`` (every n-th layer global).

  Raises:
    InputError: naming `source` and the key for what qjax's model does not compute (another activation, logit
      soft-capping, bidirectional attention, scaled RoPE on sliding layers) or a malformed value.
  """
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act != "gelu_pytorch_tanh":
    raise InputError(f"{source}: hidden_activation expected 'gelu_pytorch_tanh', got {show(act)}.")
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if hf.get(key) is not None:
      raise InputError(f"{source}: {key} is not supported (Gemma 3 has none), got {show(hf[key])}.")
  if config_bool(hf, "use_bidirectional_attention", source, default=False):
    raise InputError(f"{source}: use_bidirectional_attention is not supported; qjax's models are causal.")
  rope = hf.get("rope_parameters")
  if isinstance(rope, dict) and ("full_attention" in rope or "sliding_attention" in rope):
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
  else:
    full = hf.get("rope_scaling") or {}
    local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
  if not isinstance(full, dict) or not isinstance(local, dict):
    raise InputError(f"{source}: rope_parameters expected objects per layer type, got {show(rope)}.")
  if local.get("rope_type", "default") != "default":
    raise InputError(f"{source}: rope_parameters.sliding_attention.rope_type expected 'default', got "
                     f"{show(local['rope_type'])}.")  # fmt: skip
  layers = config_int(hf, "num_hidden_layers", source)
  types = hf.get("layer_types")
  if types is None:
    pattern = config_int(hf, "sliding_window_pattern", source, default=6)
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
  if not isinstance(types, list) or len(types) != layers or not all(t in LAYER_TYPES for t in types):
    raise InputError(f"{source}: layer_types expected {layers} entries of {LAYER_TYPES}, got {show(types)}.")
  theta = full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
  return dict(
    rope_scaling=rope_scaling(full, source),
    rope_theta=config_float({"rope_theta": theta}, "rope_theta", source),
    rope_local_theta=config_float(local, "rope_theta", source, 10000.0),
    sliding_window=config_int(hf, "sliding_window", source, default=4096),
    layer_types=tuple(types),
    query_pre_attn_scalar=config_int(hf, "query_pre_attn_scalar", source, default=256),
    tie_word_embeddings=config_bool(hf, "tie_word_embeddings", source, default=True),
    max_position_embeddings=config_int(hf, "max_position_embeddings", source, default=131072),
  )


def phi3_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """The `LlamaConfig` fields of a Phi-3 config (``Phi3Config``): its RoPE (default or LongRoPE, with the
  original length at the top level and the attention factor transformers derives) and ``partial_rotary_factor``.

  Raises:
    InputError: naming `source` and the key for another RoPE type or a malformed value.
  """
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind in ("su", "yarn"):  # transformers reads Phi-3's older names as LongRoPE
    rope["rope_type"] = kind = "longrope"
  partial = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
  fields = dict(partial_rotary_factor=config_float({"partial_rotary_factor": partial}, "partial_rotary_factor", source))
  original = config_int(hf, "original_max_position_embeddings", source,
                        default=config_int(rope, "original_max_position_embeddings", source, 4096))  # fmt: skip
  if kind != "longrope":  # the original length is kept all the same: llama.cpp's converter writes it
    scaling = rope_scaling(rope, source)
    return fields | dict(rope_scaling=dataclasses.replace(scaling, original_max_position_embeddings=original))
  max_len = config_int(hf, "max_position_embeddings", source, default=4096)
  factor = config_float(rope, "factor", source, max_len / original)
  derived = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
  scaling = rope_scaling({**rope, "original_max_position_embeddings": original}, source)
  return fields | dict(rope_scaling=dataclasses.replace(
    scaling, factor=factor, attention_factor=config_float(rope, "attention_factor", source, derived)
  ))  # fmt: skip


MAX_EXPERTS = 4096  # experts per layer a config may declare (the largest models have a few hundred)


def expert_count(values: dict, key: str, source: str, default: Any = REQUIRED) -> int:
  """``values[key]``: a count of experts in [1, `MAX_EXPERTS`] (a tensor list is built per expert, so a hostile count
  would be work without bound before any shape is compared).

  Raises:
    InputError: naming `source` and `key`.
  """
  count = config_int(values, key, source, default=default)
  if count > MAX_EXPERTS:
    raise InputError(f"{source}: {key} expected at most {MAX_EXPERTS} experts, got {count}.")
  return count


def moe_fields(hf: dict[str, Any], arch: str, source: str) -> dict[str, Any]:
  """The mixture-of-experts fields of a Mixtral or Qwen3-MoE config.

  Qwen3-MoE's dense layers are those in ``mlp_only_layers`` and those that ``decoder_sparse_step`` skips (layer `i`
  is sparse when ``(i + 1) % step == 0``), as transformers builds them.

  Raises:
    InputError: naming `source` and the key for a missing or malformed value, or more experts per token than experts.
  """
  experts_key = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
  experts = expert_count(hf, experts_key, source, default=8)
  per_token = config_int(hf, "num_experts_per_tok", source, default=2)
  if per_token > experts:
    raise InputError(f"{source}: num_experts_per_tok={per_token} expected at most {experts_key}={experts}.")
  if arch == "MixtralForCausalLM":
    return dict(num_experts=experts, num_experts_per_tok=per_token)
  layers = config_int(hf, "num_hidden_layers", source)
  step = config_int(hf, "decoder_sparse_step", source, default=1)
  only = hf.get("mlp_only_layers") or []
  if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
    raise InputError(f"{source}: mlp_only_layers expected a list of layer numbers, got {show(only)}.")
  dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
  return dict(
    num_experts=experts,
    num_experts_per_tok=per_token,
    moe_intermediate_size=config_int(hf, "moe_intermediate_size", source),
    norm_topk_prob=config_bool(hf, "norm_topk_prob", source, default=False),
    dense_layers=dense,
  )


SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def show(value: Any) -> str:
  """A value for a one-line message: its repr, cut short (a hostile file's value may be long)."""
  try:
    text = repr(value)
  except ValueError:  # an int beyond Python's digit limit
    text = f"<{type(value).__name__}>"
  return text if len(text) <= 60 else text[:57] + "..."


def _given(values: dict, key: str, source: str, default: Any) -> tuple[bool, Any]:
  """``(True, values[key])``, or ``(False, default)`` when the key is missing or null (JSON configs write null)."""
  value = values.get(key)
  if value is not None:
    return True, value
  if default is REQUIRED:
    raise InputError(f"{source}: missing key {key!r}.")
  return False, default


def config_int(values: dict, key: str, source: str, default: Any = REQUIRED, *, minimum: int = 1) -> Any:
  """``values[key]``, an integer in ``[minimum, 2**31)``: a size a tensor shape is built from.

  Raises:
    InputError: naming `source` and `key` when the key is missing (no default) or the value is not such an integer.
  """
  given, value = _given(values, key, source, default)
  if given and (isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < MAX_SIZE):
    raise InputError(f"{source}: {key} expected an integer in [{minimum}, 2**31), got {show(value)}.")
  return value


def config_float(values: dict, key: str, source: str, default: Any = REQUIRED) -> float:
  """``values[key]``, a positive finite number (norm epsilon, RoPE base or factor).

  Raises:
    InputError: naming `source` and `key` when the key is missing (no default) or the value is not such a number.
  """
  given, value = _given(values, key, source, default)
  if given and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf):
    raise InputError(f"{source}: {key} expected a positive finite number, got {show(value)}.")
  return float(value)


def config_bool(values: dict, key: str, source: str, default: bool) -> bool:
  """``values[key]``, a JSON boolean (a string such as "false" would otherwise read as true).

  Raises:
    InputError: naming `source` and `key` for any other value.
  """
  given, value = _given(values, key, source, default)
  if given and not isinstance(value, bool):
    raise InputError(f"{source}: {key} expected true or false, got {show(value)}.")
  return value


def float_list(value: Any, key: str, source: str) -> tuple[float, ...]:
  """A list of positive finite numbers (per-frequency RoPE factors)."""
  if not isinstance(value, list) or len(value) >= MAX_SIZE:
    raise InputError(f"{source}: {key} expected a list of positive numbers, got {show(value)}.")
  return tuple(config_float({key: v}, key, source) for v in value)


def token_id(values: dict, key: str, source: str) -> int | None:
  """A special token id (Hugging Face allows a list of them; the first is used), or None."""
  value = values.get(key)
  if isinstance(value, list):
    value = value[0] if value else None
  return None if value is None else config_int({key: value}, key, source, minimum=0)


def rope_scaling(rope: dict[str, Any], source: str) -> RopeScaling:
  """`RopeScaling` of a ``rope_scaling`` (or ``rope_parameters``) block.

  Raises:
    InputError: naming `source` for an unsupported rope type or a value of the wrong type.
  """
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise InputError(f"{source}: rope_scaling.rope_type expected one of {ROPE_TYPES}, got {show(rope_type)}.")
  factors = {}
  if rope_type == "longrope":
    factors = {k: float_list(rope.get(k), f"rope_scaling.{k}", source) for k in ("short_factor", "long_factor")}
  return RopeScaling(
    rope_type=rope_type,
    factor=config_float(rope, "factor", source, 1.0),
    low_freq_factor=config_float(rope, "low_freq_factor", source, 1.0),
    high_freq_factor=config_float(rope, "high_freq_factor", source, 4.0),
    original_max_position_embeddings=config_int(rope, "original_max_position_embeddings", source, 8192),
    **factors,
  )


def checked_config(values: dict, keys: dict[str, str], source: str, **fields) -> LlamaConfig:
  """A `LlamaConfig` whose sizes are read from `values` and checked, so any shape built from it is sane.

  Args:
    values: the file's key -> value (a ``config.json`` object, or GGUF metadata).
    keys: config field -> key in `values` for the sizes: `SIZE_FIELDS`, ``num_key_value_heads`` and ``head_dim``
      (these two may be absent: all heads share keys and values, and ``head_dim = hidden_size / heads``).
    source: the file, for messages.
    **fields: the other `LlamaConfig` fields, already read.

  Raises:
    InputError: naming `source` and the key of a missing size, a size that is not an integer in [1, 2**31), or
      heads that do not divide evenly.
  """
  sizes = {field: config_int(values, keys[field], source) for field in SIZE_FIELDS}
  heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
  kv_heads = config_int(values, keys["num_key_value_heads"], source, default=heads)
  if heads % kv_heads:
    raise InputError(
      f"{source}: {keys['num_attention_heads']}={heads} expected a multiple of {keys['num_key_value_heads']}="
      f"{kv_heads}."
    )
  head_dim = config_int(values, keys["head_dim"], source, default=hidden // heads or None)
  if head_dim is None:
    heads_key = keys["num_attention_heads"]
    raise InputError(f"{source}: {keys['hidden_size']}={hidden} expected at least {heads_key}={heads}.")
  if head_dim % 2:
    raise InputError(f"{source}: {keys['head_dim']} expected an even number (RoPE rotates pairs), got {head_dim}.")
  try:
    return LlamaConfig(**sizes, num_key_value_heads=kv_heads, head_dim=head_dim, **fields)
  except (ValueError, TypeError, NotImplementedError) as e:
    raise InputError(f"{source}: {e}") from e


def read_json(path: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
  """The JSON value of a small file (config, index, manifest), refused before parsing when it is not a regular
  file or is larger than `max_bytes` (a FIFO would block the open, a huge file would fill memory).

  Raises:
    FileNotFoundError: if `path` does not exist.
    InputError: naming `path` when it is not a regular file, too large, not UTF-8 or not JSON.
  """
  data = read_bounded(path, max_bytes=max_bytes, content="JSON")
  try:
    return json.loads(data)
  except (ValueError, RecursionError) as e:
    raise InputError(f"{path}: not valid JSON ({one_line(e)}).") from e
