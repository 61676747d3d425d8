"""Phi-3 (fused qkv_proj and gate_up_proj, LongRoPE, RoPE over a fraction of each head) through qjax's loader,
every format and llama.cpp."""

import dataclasses
import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from qjax.calib import text as texts
from qjax.cli.quantize import Settings
from qjax.core.errors import InputError
from qjax.core.tree import leaves_with_paths
from qjax.formats import GgufCheckpoint, export, load_model, open_checkpoint, parse_target
from qjax.models import LlamaConfig
from qjax.models.config import RopeScaling
from tests.formats.test_gguf import (
  assert_f32_reads_back_and_runs_in_llama_cpp,
  assert_recipe_is_llama_quantizes,
  export_f32,
)
from tests.formats.test_gptq import FAMILY_EXPORTS, assert_reads_back, assert_transformers_agrees, family_export
from tests.fuzz import harness
from tests.model_factory import assert_logits_match_transformers, quantize_like_cli, write_random_llama

# The phi3.* keys llama.cpp's convert_hf_to_gguf.py writes for the LongRoPE model below (its vendored copy, run by
# hand on this model: the same keys and values, and every tensor byte for byte).
CONVERTER_KEYS = [
  "phi3.attention.head_count", "phi3.attention.head_count_kv", "phi3.attention.layer_norm_rms_epsilon",
  "phi3.attention.sliding_window", "phi3.block_count", "phi3.context_length", "phi3.embedding_length",
  "phi3.feed_forward_length", "phi3.rope.dimension_count", "phi3.rope.freq_base", "phi3.rope.scaling.attn_factor",
  "phi3.rope.scaling.original_context_length",
]  # fmt: skip


def longrope(rotary_dim: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  factors = lambda lo, hi: [float(f) for f in rng.uniform(lo, hi, rotary_dim // 2).round(4)]
  return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors(1.0, 1.5),
          "long_factor": factors(1.0, 8.0)}  # fmt: skip


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
  """A random untied Phi-3 with rows of whole 256-blocks, LongRoPE (original length 64 of 1024: attention factor
  1.29) over half of each head. (Its directory name becomes the GGUF's general.name, and llama.cpp looks up Phi-3's
  own special tokens in any model named like "phi3", which this vocabulary lacks.)"""
  return write_random_llama(str(tmp_path_factory.mktemp("fused")), layers=2, hidden=256, intermediate=512, heads=4,
                            kv_heads=2, family="Phi3", rope_parameters=longrope(32), partial_rotary_factor=0.5,
                            original_max_position_embeddings=64)  # fmt: skip


def window(checkpoint, n=96):
  """The evaluation text's first `n` tokens: beyond the original length, so LongRoPE uses its long factors (llama.cpp
  too, whose context is then longer than the original)."""
  return texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:n]


@pytest.mark.parametrize(
  "options",
  [
    dict(tie=False, rope_parameters=longrope(12), partial_rotary_factor=0.75, original_max_position_embeddings=16,
         sliding_window=8),
    dict(tie=True, rope_parameters=longrope(16, seed=1), original_max_position_embeddings=32),
  ],
  ids=["untied_long_factors_partial_rotary_window", "tied_short_factors"],
)  # fmt: skip
def test_logits_match_transformers(tmp_path, options):
  pytest.importorskip("torch")
  import transformers

  path = write_random_llama(str(tmp_path / "m"), layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2,
                            family="Phi3", **options)  # fmt: skip
  with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= set(f.keys())
  ids = np.random.default_rng(0).integers(0, 1000, (2, 20))  # beyond an original length of 16, within one of 32
  config = assert_logits_match_transformers(path, ids, f"Phi-3 {sorted(options)}").config
  assert config.fused_projections and config.rope_scaling.rope_type == "longrope"
  assert config.rope_scaling.attention_factor > 1.1  # max_position_embeddings 1024 over 16 or 32
  # the config qjax writes is read back by transformers and by qjax as the same model
  hf = transformers.AutoConfig.for_model(**config.to_hf_dict())
  assert hf.rope_parameters["rope_type"] == "longrope"
  assert hf.original_max_position_embeddings == options["original_max_position_embeddings"]
  assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config


@pytest.mark.slow
def test_gguf_is_llama_cpps_and_runs_there(phi3, tmp_path):
  checkpoint = open_checkpoint(phi3)
  f32, reader = export_f32(phi3, str(tmp_path / "f"), "phi3", CONVERTER_KEYS)
  stored = {t.name: np.asarray(t.data) for t in reader.tensors}
  with safe_open(os.path.join(phi3, "model.safetensors"), "numpy") as f:  # the fused tensors, as the model stores them
    for gguf_name, hf_name in [("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")]:
      np.testing.assert_array_equal(
        stored[f"blk.1.{gguf_name}.weight"], f.get_tensor(f"model.layers.1.{hf_name}.weight")
      )
  rope = checkpoint.config.rope_scaling
  np.testing.assert_array_equal(stored["rope_factors_long.weight"], np.float32(rope.long_factor))
  back = assert_f32_reads_back_and_runs_in_llama_cpp(checkpoint, f32, window(checkpoint))
  back_rope = back.config.rope_scaling  # GGUF holds float32 factors
  assert back.config.rotary_dim == 32 and back_rope.original_max_position_embeddings == 64 and back_rope.factor == 16
  for key in ("short_factor", "long_factor", "attention_factor"):
    np.testing.assert_array_equal(np.float32(getattr(back_rope, key)), np.float32(getattr(rope, key)))
  assert_recipe_is_llama_quantizes(phi3, f32, tmp_path)  # attn_qkv typed as attn_v: Q6_K in both layers of two


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
@FAMILY_EXPORTS
def test_hf_exports_fuse_load_in_transformers_and_back(phi3, tmp_path, settings):
  checkpoint, config, params, out = family_export(phi3, str(tmp_path / "q"), settings, seqlen=96)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model_type"] == "phi3"
  with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
    names = set(f.keys())
  assert "model.layers.0.self_attn.qkv_proj.qweight" in names and "model.layers.0.mlp.gate_up_proj.scales" in names
  assert not any("q_proj" in n or "gate_proj." in n for n in names)
  loaded = load_model(out)
  assert loaded.config == config
  assert_reads_back(params, loaded.params, dense_atol=1e-3)  # norms in float16
  assert_transformers_agrees(out, window(checkpoint, 192).reshape(2, 96), f"Phi-3 {settings}")


def test_bad_phi3_configs_are_named(phi3, tmp_path):
  with open(os.path.join(phi3, "config.json")) as f:
    hf = json.load(f)
  rope = hf.get("rope_parameters") or hf["rope_scaling"]
  for change, message in [
    (dict(rope_parameters={**rope, "long_factor": rope["long_factor"][:-1]}), r"long_factor expected 16 factors"),
    (dict(rope_parameters={**rope, "rope_type": "dynamic"}), r"rope_type expected one of"),
    (dict(partial_rotary_factor=0.01), r"partial_rotary_factor=0.01 of head_dim=64"),
  ]:
    with pytest.raises(InputError, match=r"config\.json: .*" + message):
      LlamaConfig.from_hf_dict({**hf, **change}, source="config.json")
  llama = {**hf, "architectures": ["LlamaForCausalLM"], "rope_scaling": rope}
  with pytest.raises(InputError, match=r"'longrope' is supported for Phi3ForCausalLM only"):
    LlamaConfig.from_hf_dict(llama, source="config.json")


def test_compressed_tensors_export_fuses_and_reads_back(phi3, tmp_path):
  s = Settings(model=phi3, method="rtn", export="compressed-tensors", group_size=64, sym=False)
  checkpoint, config, params = quantize_like_cli(s)
  out = export(parse_target(s.export), str(tmp_path / "ct"), config, params, checkpoint.tokenizer(), name="phi3")
  with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
    packed = f.get_tensor("model.layers.0.self_attn.qkv_proj.weight_packed")
  assert packed.shape == (256 + 2 * 128, 256 // 8)  # q, k and v rows in one tensor, 8 codes a word
  assert_reads_back(params, load_model(out).params)


def test_tiny_phi3_gguf_round_trip_and_bad_rope_factors(tmp_path):
  rope = RopeScaling(rope_type="longrope", short_factor=(1.0, 1.5, 2.0, 2.5), long_factor=(2.0, 3.0, 4.0, 5.0),
                     factor=2.0, attention_factor=1.25, original_max_position_embeddings=64)  # fmt: skip
  # phi3 files carry no vocab_size key: the vocabulary is the 63 tokens of the harness's tokenizer; GGUF holds the
  # epsilon in float32
  config = dataclasses.replace(harness.TINY, architecture="Phi3ForCausalLM", rope_scaling=rope, vocab_size=63,
                               rms_norm_eps=float(np.float32(1e-5)))  # fmt: skip
  path = str(tmp_path / "phi3.gguf")
  harness.write_gguf_file(path, config)
  back = GgufCheckpoint(path)
  assert back.config == config  # the factors are exact in float32
  for (p, a), (_, b) in zip(leaves_with_paths(harness.random_params(config)), leaves_with_paths(back.params()),
                            strict=True):  # fmt: skip
    np.testing.assert_array_equal(a, b, err_msg=p)  # split back from attn_qkv and the fused ffn_up
  harness.write_gguf_file(path, dataclasses.replace(config, rope_scaling=dataclasses.replace(rope, long_factor=(
    2.0, -3.0, 4.0, 5.0))))  # fmt: skip
  with pytest.raises(InputError, match=r"phi3\.gguf: tensor rope_factors_long\.weight expected positive frequency"):
    GgufCheckpoint(path)
