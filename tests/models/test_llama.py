"""Logit parity of the Flax Llama family (Qwen3 included) with `transformers` (torch, float32) on random small
configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import QSpec, dequantize
from qjax.models import LlamaForCausalLM, SafetensorsCheckpoint, generate, init_caches
from qjax.transforms import quantize_params, rtn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=256,
  rms_norm_eps=1e-5,
)
VARIANTS = {
  "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=10000.0)),
  "llama_tied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
  "llama3_rope": (
    "LlamaConfig",
    dict(
      num_key_value_heads=2,
      rope_theta=500000.0,
      rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
      ),
    ),
  ),
  "qwen2_bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
  "qwen3": ("Qwen3Config", dict(num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, rope_theta=1e6)),
  "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8, head_dim=16)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_model_dir(request, tmp_path_factory):
  config_cls, extra = VARIANTS[request.param]
  config = getattr(transformers, config_cls)(**SMALL, **extra)
  torch.manual_seed(0)
  model_cls = {
    "LlamaConfig": "LlamaForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "MistralConfig": "MistralForCausalLM",
  }
  model = getattr(transformers, model_cls[config_cls])(config).eval()
  with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they are tested
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return path, model


def _ids(seed=0, shape=(2, 24)):
  return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], size=shape)


def test_logits_match_transformers(hf_model_dir):
  path, hf = hf_model_dir
  ckpt = SafetensorsCheckpoint(str(path))
  ids = _ids()
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  model = LlamaForCausalLM(ckpt.config)
  out = np.asarray(jax.jit(model.apply)({"params": ckpt.params()}, jnp.asarray(ids)))
  assert np.abs(out - ref).max() < 1e-4


def test_kv_cache_decode_matches_full_forward(hf_model_dir):
  path, _ = hf_model_dir
  ckpt = SafetensorsCheckpoint(str(path))
  model, params = LlamaForCausalLM(ckpt.config), ckpt.params()
  ids = jnp.asarray(_ids(1, (2, 16)))
  full = model.apply({"params": params}, ids)
  caches = init_caches(ckpt.config, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  prefill, caches = model.apply({"params": params}, ids[:, :10], pos, caches)
  steps = [prefill]
  for t in range(10, 16):
    logits, caches = model.apply({"params": params}, ids[:, t : t + 1], jnp.full((2, 1), t), caches)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4)


def test_greedy_generate_matches_transformers(hf_model_dir):
  path, hf = hf_model_dir
  ckpt = SafetensorsCheckpoint(str(path))
  prompt = _ids(2, (1, 6))
  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 6:].numpy()
  out = generate(LlamaForCausalLM(ckpt.config), ckpt.params(), jnp.asarray(prompt), max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(out[0]), ref)


def test_quantized_params_run_unchanged(hf_model_dir):
  path, _ = hf_model_dir
  ckpt = SafetensorsCheckpoint(str(path))
  model, params = LlamaForCausalLM(ckpt.config), ckpt.params()
  qparams = quantize_params(params, [(".*_proj/kernel", rtn(QSpec(bits=4, group_size=32)))])
  dense = jax.tree.map(
    lambda x: dequantize(x) if hasattr(x, "spec") else x, qparams, is_leaf=lambda x: hasattr(x, "spec")
  )
  ids = jnp.asarray(_ids(3))
  np.testing.assert_allclose(model.apply({"params": qparams}, ids), model.apply({"params": dense}, ids), atol=1e-4)


def test_bfloat16_forward_is_close_to_float32(hf_model_dir):
  path, _ = hf_model_dir
  cfg = SafetensorsCheckpoint(str(path)).config
  params = SafetensorsCheckpoint(str(path)).params()
  ids = jnp.asarray(_ids(4))
  f32 = LlamaForCausalLM(cfg).apply({"params": params}, ids)
  bf16_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  bf16 = LlamaForCausalLM(cfg, jnp.bfloat16).apply({"params": bf16_params}, ids)
  assert bf16.dtype == jnp.float32
  assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.05 * np.abs(np.asarray(f32)).max()
  assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9
