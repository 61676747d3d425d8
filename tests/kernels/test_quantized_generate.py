"""Quantized models through the kernels: the default model's greedy tokens, and kernel-layout params in a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import QSpec
from qjax.formats import open_checkpoint
from qjax.kernels import is_kernel_layout, qmatmul_mode, to_kernel_layout_params
from qjax.kernels.qmatmul import PortableConfig
from qjax.models import LlamaConfig, LlamaForCausalLM, generate
from qjax.transforms import quantize_params, rtn

PROJECTIONS = r"model/layers_\d+/.*_proj/kernel"
# One block per call: interpret mode then lowers and compiles one small program per layer
# shape instead of a loop over tiles (about 4x faster to compile for the default model).
ONE_BLOCK = PortableConfig(block_m=4096, block_n=4096, block_k=4096)


@pytest.fixture
def fresh_traces():
  """`qmatmul_mode` is read at trace time: drop cached traces before and after, so no test sees another's path."""
  jax.clear_caches()
  yield
  jax.clear_caches()


def test_generate_same_tokens_through_the_kernel(fresh_traces):
  checkpoint = open_checkpoint("default")
  model = LlamaForCausalLM(checkpoint.config)
  params = quantize_params(checkpoint.params(), [(PROJECTIONS, rtn(QSpec(bits=4, group_size=64)))])
  prompt = jnp.asarray([checkpoint.tokenizer()("The capital of France is")["input_ids"]], jnp.int32)
  reference = generate(model, params, prompt, max_new_tokens=4)  # CPU: qmatmul picks the reference
  jax.clear_caches()
  with qmatmul_mode("portable", interpret=True, config=ONE_BLOCK):
    kernel = generate(model, params, prompt, max_new_tokens=4)  # prefill (m = prompt) and 3 KV-cache decode steps
  np.testing.assert_array_equal(kernel, reference)


def test_model_runs_kernel_layout_params(fresh_traces):
  config = LlamaConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
  )
  model = LlamaForCausalLM(config)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  quantized = quantize_params(params, [(PROJECTIONS, rtn(QSpec(bits=4, group_size=32, symmetric=False)))])
  converted = to_kernel_layout_params(quantized)
  assert is_kernel_layout(converted["model"]["layers_0"]["mlp"]["up_proj"]["kernel"])
  reference = model.apply({"params": quantized}, ids)
  kernel = model.apply({"params": converted}, ids)  # kernel-layout leaves: the XLA int4 path on CPU
  np.testing.assert_allclose(kernel, reference, rtol=1e-5, atol=1e-5)
