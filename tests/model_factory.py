"""Small random Hugging Face models written to disk, for tests that need a model directory."""

import os

import numpy as np

LINEARS = r"model/layers_\d+/(self_attn|mlp)/\w+_proj/kernel"


def write_random_llama(
  path: str,
  *,
  layers: int = 2,
  hidden: int = 64,
  intermediate: int = 128,
  heads: int = 4,
  kv_heads: int = 2,
  vocab: int | None = None,
  tie: bool = False,
  seed: int = 0,
  family: str = "Llama",
  head_dim: int | None = None,
  **config_kwargs,
) -> str:
  """A random ``{family}ForCausalLM`` (``Llama``, ``Qwen3``, ``Gemma3``, ...) with the default model's tokenizer,
  saved with safetensors; `config_kwargs` go to the family's config.

  Norm weights are perturbed away from their identity so that they matter. Returns `path`.
  """
  import torch
  import transformers

  from qjax.formats import default_model_dir
  from qjax.models import SafetensorsCheckpoint

  tokenizer = SafetensorsCheckpoint.load_tokenizer(default_model_dir(), _vocab_config())
  config_class = getattr(transformers, f"{family}TextConfig" if family == "Gemma3" else f"{family}Config")
  config = config_class(
    vocab_size=vocab or len(tokenizer),
    hidden_size=hidden,
    intermediate_size=intermediate,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    max_position_embeddings=1024,
    tie_word_embeddings=tie,
    rms_norm_eps=1e-5,
    head_dim=head_dim or hidden // heads,
    **config_kwargs,
  )
  torch.manual_seed(seed)
  model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((0.0 if family == "Gemma3" else 1.0) + 0.1 * torch.randn_like(p))  # Gemma applies 1 + w
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path


def write_random_moe(path: str, *, family: str = "Mixtral", layers: int = 2, **config_kwargs) -> str:
  """A random ``{family}ForCausalLM`` mixture of experts (`write_random_llama`'s sizes), its router weights scaled
  up so each token's top-k experts win by clear margins (transformers and qjax route alike despite float
  rounding)."""
  import torch
  from safetensors.torch import load_file, save_file

  write_random_llama(path, family=family, layers=layers, **config_kwargs)
  weights = os.path.join(path, "model.safetensors")
  tensors = load_file(weights)
  generator = torch.Generator().manual_seed(1)
  for name, t in tensors.items():
    if name.endswith(".gate.weight"):
      tensors[name] = torch.randn(t.shape, generator=generator) * 0.5
  save_file(tensors, weights, metadata={"format": "pt"})
  return path


def assert_logits_match_transformers(path: str, ids: np.ndarray, label: str):
  """qjax's logits for the Hugging Face directory `path` (through qjax's own loader) on `ids` are transformers'
  (torch, float32) within 1e-4. Returns qjax's checkpoint."""
  import jax.numpy as jnp
  import torch
  import transformers

  from qjax.formats import open_checkpoint
  from qjax.models import logits_fn

  checkpoint = open_checkpoint(path)
  ours = np.asarray(logits_fn(checkpoint.config, checkpoint.params())(jnp.asarray(ids)))
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  print(f"{label}: max |Δlogit| against transformers {np.abs(ours - theirs).max():.3g}")
  assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()
  return checkpoint


def _vocab_config():
  from qjax.models import LlamaConfig

  return LlamaConfig(
      vocab_size=1 << 20, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
      num_key_value_heads=1, head_dim=8,
  )  # fmt: skip


def random_windows(n: int, seqlen: int, vocab: int = 1000, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(n, seqlen), dtype=np.int32)


def quantized_params(model_dir: str, spec, pattern: str = LINEARS):
  """``(checkpoint, params)``: the model at `model_dir` with the kernels matching `pattern` rounded to `spec`."""
  from qjax.formats import open_checkpoint
  from qjax.transforms import Rule, quantize_params, rtn

  checkpoint = open_checkpoint(model_dir)
  return checkpoint, quantize_params(checkpoint.params(), [Rule(pattern, rtn(spec))])


def quantize_like_cli(settings, *, checkpoint=None, windows=None):
  """``(checkpoint, config, params)``: the model of `settings` (`qjax.cli.quantize.Settings`) run through the recipe
  its flags name, calibrated on the flags' text as `qjax quantize` does, without writing or evaluating anything."""
  from qjax.cli.quantize import quantize_with
  from qjax.formats import open_checkpoint

  checkpoint = checkpoint or open_checkpoint(settings.model)
  _, config, params = quantize_with(settings, checkpoint=checkpoint, windows=windows)
  return checkpoint, config, params
