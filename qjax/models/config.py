"""`LlamaConfig`: the hyperparameters of the decoder-only Llama family, as Hugging Face defines them."""

import dataclasses
import json
import os
from typing import Any, Literal

# Hugging Face architecture name -> what differs from plain Llama.
ARCHITECTURES = {
  "LlamaForCausalLM": {},
  "MistralForCausalLM": {},
  "Qwen2ForCausalLM": {"attention_bias": True},
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling (``rope_scaling`` / ``rope_parameters`` in a HF config).

  Attributes:
    rope_type: ``"default"`` (none), ``"linear"`` (positions divided by `factor`) or
      ``"llama3"`` (Llama 3.1's wavelength-dependent scaling of the frequencies).
  """

  rope_type: Literal["default", "linear", "llama3"] = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hyperparameters of a Llama-family decoder (Llama 1-3, Mistral, Qwen2, SmolLM).

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

  @property
  def model_type(self) -> str:
    return {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}[
      self.architecture
    ]

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> "LlamaConfig":
    """Builds a config from a Hugging Face ``config.json`` dictionary.

    Raises:
      ValueError: naming `source` when the architecture is unsupported or a key is missing.
    """
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
      raise ValueError(
        f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; qjax supports {sorted(ARCHITECTURES)}."
      )
    try:
      heads = hf["num_attention_heads"]
      rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
      rope_type = rope.get("rope_type", rope.get("type", "default"))
      scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
      )
      theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
      sliding = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "MistralForCausalLM") else None
      return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rope_freq_factors=tuple(hf["qjax_rope_freq_factors"]) if hf.get("qjax_rope_freq_factors") else None,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", ARCHITECTURES[arch].get("attention_bias", False))),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding,
        architecture=arch,
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
      )
    except KeyError as e:
      raise ValueError(f"{source}: missing key {e.args[0]!r} for {arch}.") from e

  @classmethod
  def from_pretrained(cls, model_dir: str) -> "LlamaConfig":
    """Reads ``config.json`` from a Hugging Face model directory."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no config.json; is {model_dir!r} a Hugging Face model directory?")
    with open(path) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    return cls.from_hf_dict(hf, source=path)

  def to_hf_dict(self) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dictionary of this config."""
    rope = None
    if self.rope_scaling.rope_type != "default":
      rope = dataclasses.asdict(self.rope_scaling)
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
    if self.rope_freq_factors is not None:
      hf["qjax_rope_freq_factors"] = list(self.rope_freq_factors)  # no Hugging Face key holds explicit factors
    if self.sliding_window is not None:
      hf.update(sliding_window=self.sliding_window, use_sliding_window=True)
    return hf


def _first_id(value):
  if isinstance(value, list):
    return value[0] if value else None
  return value
