"""Qwen3 (RMSNorm over each head's queries and keys, no Q/K permutation in GGUF, head_dim apart from hidden/heads)
through every format: GGUF as llama.cpp writes and runs it, GPTQ, AWQ and compressed-tensors directories that
transformers loads, and qjax's importers back."""

import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.formats import GgufCheckpoint, load_model, open_checkpoint
from qjax.models import logits_fn
from tests.formats.test_gguf import (
  assert_f32_reads_back_and_runs_in_llama_cpp,
  assert_recipe_is_llama_quantizes,
  export_f32,
  llama_cpp_logits,
)
from tests.formats.test_gptq import FAMILY_EXPORTS, assert_reads_back, assert_transformers_agrees, family_export
from tests.model_factory import write_random_llama

# The qwen3.* keys llama.cpp's convert_hf_to_gguf.py writes for such a model (its vendored copy, run by hand on this
# model: the same keys and values, every tensor byte for byte; it needs sentencepiece importable, so no test runs it).
CONVERTER_KEYS = [
  "qwen3.attention.head_count", "qwen3.attention.head_count_kv", "qwen3.attention.key_length",
  "qwen3.attention.layer_norm_rms_epsilon", "qwen3.attention.value_length", "qwen3.block_count",
  "qwen3.context_length", "qwen3.embedding_length", "qwen3.feed_forward_length", "qwen3.rope.freq_base",
]  # fmt: skip


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
  """A random Qwen3 whose rows are whole 256-blocks, with head_dim 96 (hidden / heads would be 64)."""
  return write_random_llama(str(tmp_path_factory.mktemp("qwen3")), layers=2, hidden=256, intermediate=512, heads=4,
                            kv_heads=2, family="Qwen3", head_dim=96)  # fmt: skip


def window(checkpoint, n=96):
  return texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:n]


@pytest.mark.slow
def test_gguf_is_llama_cpps_and_runs_there(qwen3, tmp_path):
  checkpoint = open_checkpoint(qwen3)
  assert checkpoint.config.qk_norm and checkpoint.config.head_dim == 96
  f32, reader = export_f32(qwen3, str(tmp_path / "f"), "qwen3", CONVERTER_KEYS)
  types = {t.name: t.tensor_type.name for t in reader.tensors}
  assert types["blk.1.attn_q_norm.weight"] == types["blk.1.attn_k_norm.weight"] == "F32"
  w = window(checkpoint)
  assert_f32_reads_back_and_runs_in_llama_cpp(checkpoint, f32, w)  # no permutation to undo
  # Q4_K_M: llama_quantize's own file from the F32 one, tensor for tensor; llama.cpp runs it as qjax does
  q4 = assert_recipe_is_llama_quantizes(qwen3, f32, tmp_path)
  quantized = GgufCheckpoint(q4)
  ours = np.asarray(logits_fn(quantized.config, quantized.params())(jnp.asarray(w[None])))[0]
  theirs = llama_cpp_logits(q4, w)  # llama.cpp rounds activations to 8 bits for k-quant dot products
  rms = lambda x: float(np.sqrt(np.mean(x**2)))
  assert rms(ours - theirs) < 0.02 * rms(ours)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
@FAMILY_EXPORTS
def test_hf_exports_load_in_transformers_and_back(qwen3, tmp_path, settings):
  checkpoint, config, params, out = family_export(qwen3, str(tmp_path / "q"), settings)
  loaded = load_model(out)
  assert loaded.config == config and config.architecture == "Qwen3ForCausalLM"
  assert_reads_back(params, loaded.params)
  assert_transformers_agrees(out, window(checkpoint, 128).reshape(2, 64), f"Qwen3 {settings}")
