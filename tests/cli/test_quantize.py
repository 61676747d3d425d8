"""`qjax quantize` in-process: settings checked before any work, runs end to end, each registered method."""

import dataclasses
import json
import os

import pytest

from qjax.cli import recipes as cli_recipes
from qjax.cli.quantize import Settings, plan, run
from qjax.formats import load_model
from qjax.formats.targets import output_path
from qjax.models import LlamaConfig
from qjax.transforms import recipes

CONFIG = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip


def _settings(model_dir, out, **kw):
  base = dict(model=model_dir, nsamples=4, seqlen=32, eval_windows=2, batch_size=2, out=out)
  return Settings(**{**base, **kw})


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_run_writes_a_model_that_evaluates_the_same(model_dir, tmp_path, method):
  out = str(tmp_path / method)
  s = _settings(model_dir, out, method=method, group_size=64, checkpoint_dir=out + ".ckpt")
  report, written, _ = run(s, show_progress=False)
  table = report.table()
  assert "perplexity" in table and method in table and written == out
  assert 4.0 < report.bits_per_weight < 4.6
  assert not os.path.exists(out + ".ckpt")  # removed after success
  loaded = load_model(out)
  assert loaded.reference == model_dir
  kernel = loaded.params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert kernel.spec.bits == 4 and kernel.shape == (128, 64)
  assert 0 < report.evaluation.kl_divergence < 1.0
  assert json.dumps(report.as_dict())


def test_bad_settings():
  with pytest.raises(ValueError, match="--group_size must be one of"):
    plan(Settings(group_size=100), CONFIG)
  with pytest.raises(ValueError, match="--method=magic: unknown"):
    plan(Settings(method="magic"), CONFIG)
  with pytest.raises(ValueError, match="quantizes nothing by itself"):
    plan(Settings(method="none"), CONFIG)
  with pytest.raises(ValueError, match="--imatrix applies to GGUF recipes"):
    plan(Settings(imatrix=True), CONFIG)
  with pytest.raises(ValueError, match="not both"):
    plan(Settings(recipe="x.py:recipe"), CONFIG, method_given=True)
  # A model llama.cpp cannot be told about is refused before quantizing, not when the file is written.
  gemma = dataclasses.replace(CONFIG, architecture="Gemma3ForCausalLM", query_pre_attn_scalar=256)
  with pytest.raises(NotImplementedError, match="query_pre_attn_scalar=256 cannot be written to GGUF"):
    plan(Settings(method="none", export="gguf:Q4_K_M"), gemma)
  plan(Settings(method="none", export="gguf:Q4_K_M"), dataclasses.replace(gemma, query_pre_attn_scalar=16))


def test_calibration_text_shorter_than_a_sequence_leaves_no_output(model_dir, tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("too short")
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="fewer than one sequence of seqlen=32"):
    run(_settings(model_dir, out, calib=str(short)), show_progress=False)
  assert not os.path.exists(out)


@pytest.mark.parametrize("method", ["awq+gptq", "rotate+gptq", "rotate+rtn", "lwc"])
def test_composed_methods_run_end_to_end(model_dir, tmp_path, method):
  out = str(tmp_path / "m")
  report, _, _ = run(_settings(model_dir, out, method=method, group_size=32, sym=False), show_progress=False)
  assert 0 < report.evaluation.kl_divergence < 1.0
  loaded = load_model(out)
  assert loaded.params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"].spec.bits == 4
  if method.startswith("rotate"):
    assert not loaded.config.tie_word_embeddings and "lm_head" in loaded.params


def test_awq_scales_before_llama_cpp_encoders(model_dir, tmp_path):
  s = _settings(model_dir, str(tmp_path / "g"), method="awq", export="gguf:Q8_0")
  report, written, p = run(s, show_progress=False)
  assert report.evaluation.kl_divergence < 0.05
  assert written == output_path(p.target, s.out) and os.path.exists(written)


def test_awq_only_scales_before_gptq(monkeypatch):
  # Clipping is for round-to-nearest; GPTQ should reconstruct the unclamped weights.
  calls = []
  monkeypatch.setattr(recipes, "awq_scaling", lambda spec, **kw: calls.append(kw) or recipes.rotation())
  plan(Settings(method="awq+gptq"), CONFIG)
  plan(Settings(method="awq"), CONFIG)
  assert calls == [{"clip": False}, {}]


def test_every_method_builds_a_recipe_for_each_kind_of_target():
  for name in cli_recipes.METHODS:
    if name != "none":
      assert plan(Settings(method=name), CONFIG).recipe.stages, name
    gguf = plan(Settings(method=name, export="gguf:Q4_K_M"), CONFIG).recipe
    assert gguf.name.endswith("gguf Q4_K_M") and ("gptq gguf" in gguf.name) == ("gptq" in name), (name, gguf.name)
  with pytest.raises(ValueError, match="has no g_idx"):
    plan(Settings(method="gptq", desc_act=True, export="gguf:Q4_K_M"), CONFIG)


def test_gptq_into_a_gguf_recipe_is_dampened_more_unless_told():
  from qjax.cli.quantize import DAMP, GGUF_DAMP, run_id

  for export, default in [("gguf:Q4_K_M", GGUF_DAMP), ("gptq", DAMP)]:
    s = Settings(method="gptq", export=export, group_size=64)
    assert run_id(s, plan(s, CONFIG))["damp_percent"] == default
    s = Settings(method="gptq", export=export, group_size=64, damp_percent=0.05)
    assert run_id(s, plan(s, CONFIG))["damp_percent"] == 0.05
  with pytest.raises(ValueError, match=r"--damp_percent must be in \[0, 1\), got 1.5"):
    plan(Settings(method="gptq", export="gguf:Q4_K_M", damp_percent=1.5), CONFIG)
