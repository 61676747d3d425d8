"""Gemma 3 (GeGLU, embeddings scaled by sqrt(hidden), four norms per block stored as w for 1 + w, sliding-window and
global layers with their own RoPE bases, query_pre_attn_scalar) through qjax's loader, every format and llama.cpp."""

import dataclasses
import json
import os

import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, plan
from qjax.core.errors import InputError
from qjax.formats import load_model, open_checkpoint
from qjax.models import LlamaConfig
from tests.formats.test_gguf import (
  assert_f32_reads_back_and_runs_in_llama_cpp,
  assert_recipe_is_llama_quantizes,
  export_f32,
)
from tests.formats.test_gptq import FAMILY_EXPORTS, assert_reads_back, assert_transformers_agrees, family_export
from tests.model_factory import assert_logits_match_transformers, write_random_llama

# The gemma3.* keys llama.cpp's convert_hf_to_gguf.py writes for the `gemma3` model below (its vendored copy, run by
# hand: the same keys and values and every tensor byte for byte, norms stored as 1 + w). qjax adds
# attention.sliding_window_pattern only for a pattern other than llama.cpp's every-6th-layer default.
CONVERTER_KEYS = [
  "gemma3.attention.head_count", "gemma3.attention.head_count_kv", "gemma3.attention.key_length",
  "gemma3.attention.layer_norm_rms_epsilon", "gemma3.attention.sliding_window", "gemma3.attention.value_length",
  "gemma3.block_count", "gemma3.context_length", "gemma3.embedding_length", "gemma3.feed_forward_length",
  "gemma3.rope.freq_base", "gemma3.rope.freq_base_swa",
]  # fmt: skip


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
  """A random tied Gemma 3 with rows of whole 256-blocks: 6 layers (the 6th global, as llama.cpp assumes without a
  pattern key), a 16-token window, head_dim 128 apart from hidden / heads."""
  return write_random_llama(str(tmp_path_factory.mktemp("gemma3")), layers=6, hidden=256, intermediate=512, heads=4,
                            kv_heads=1, tie=True, family="Gemma3", head_dim=128, sliding_window=16,
                            query_pre_attn_scalar=128)  # fmt: skip


def window(checkpoint, n=96):
  return texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:n]


@pytest.mark.parametrize(
  "options",
  [
    dict(tie=True, sliding_window=8, query_pre_attn_scalar=24,
         layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    dict(tie=False, sliding_window=5, rope_parameters={
      "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
  ],
  ids=["tied_layer_types_scalar", "untied_linear_rope"],
)  # fmt: skip
def test_logits_match_transformers(tmp_path, options):
  pytest.importorskip("torch")
  import transformers

  path = write_random_llama(str(tmp_path / "m"), layers=3, hidden=64, intermediate=96, heads=4, kv_heads=2,
                            family="Gemma3", head_dim=32, **options)  # fmt: skip
  ids = np.random.default_rng(0).integers(0, 1000, (2, 20))  # longer than either window
  config = assert_logits_match_transformers(path, ids, f"Gemma 3 {options}").config
  assert config.gemma and config.qk_norm and config.sliding(0) and config.embed_scale == 8.0
  # the config qjax writes is read back by transformers and by qjax as the same model
  hf = transformers.AutoConfig.for_model(**config.to_hf_dict())
  assert hf.layer_types == list(config.layer_types) and hf.query_pre_attn_scalar == config.query_pre_attn_scalar
  assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config


@pytest.mark.slow
def test_gguf_is_llama_cpps_and_runs_there(gemma3, tmp_path):
  checkpoint = open_checkpoint(gemma3)
  f32, reader = export_f32(gemma3, str(tmp_path / "f"), "gemma3", CONVERTER_KEYS)
  stored = {t.name: np.asarray(t.data) for t in reader.tensors}
  hf_norm = np.asarray(checkpoint.params()["model"]["layers_0"]["post_feedforward_layernorm"]["scale"])
  np.testing.assert_array_equal(stored["blk.0.post_ffw_norm.weight"], hf_norm)  # 1 + w, as the converter writes
  back = assert_f32_reads_back_and_runs_in_llama_cpp(checkpoint, f32, window(checkpoint))  # 96 tokens, window 16
  assert back.config.layer_types == checkpoint.config.layer_types and back.config.rope_local_theta == 10000.0
  assert_recipe_is_llama_quantizes(gemma3, f32, tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
@FAMILY_EXPORTS
def test_hf_exports_load_in_transformers_and_back(gemma3, tmp_path, settings):
  checkpoint, config, params, out = family_export(gemma3, str(tmp_path / "q"), settings)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model_type"] == "gemma3_text"
  loaded = load_model(out)
  assert loaded.config == config
  assert_reads_back(params, loaded.params, dense_atol=1e-3)  # norms go out as w = scale - 1 in float16, back as 1 + w
  assert_transformers_agrees(out, window(checkpoint, 128).reshape(2, 64), f"Gemma 3 {settings}")


def test_what_gemma_cannot_do_is_named(gemma3, tmp_path):
  with pytest.raises(ValueError, match=r"model/layers_0: a rotation cannot be folded into Gemma blocks"):
    plan(Settings(model=gemma3, method="rotate+rtn"), open_checkpoint(gemma3).config)  # before any work
  with open(os.path.join(gemma3, "config.json")) as f:
    hf = json.load(f)
  for key, value, message in [
    ("hidden_activation", "gelu", r"hidden_activation expected 'gelu_pytorch_tanh', got 'gelu'"),
    ("final_logit_softcapping", 30.0, r"final_logit_softcapping is not supported"),
    ("layer_types", ["full_attention"], r"layer_types expected 6 entries"),
  ]:
    with pytest.raises(InputError, match=rf"x\.json: {message}"):
      LlamaConfig.from_hf_dict({**hf, key: value}, source="x.json")
  odd = dataclasses.replace(open_checkpoint(gemma3).config, query_pre_attn_scalar=100)
  with pytest.raises(NotImplementedError, match=r"query_pre_attn_scalar=100 cannot be written to GGUF"):
    from qjax.formats.gguf import model_metadata

    model_metadata(odd, file_type="F32", name="x")
