import json
import os

import pytest

from qjax import pipeline
from qjax.formats.loading import load_model
from qjax.pipeline import QuantizeJob, run_job


def _job(model_dir, out, **kw):
  base = dict(model=model_dir, nsamples=4, seqlen=32, eval_windows=2, batch_size=2, out=out)
  return QuantizeJob(**{**base, **kw})


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_job_writes_a_model_that_evaluates_the_same(model_dir, tmp_path, method):
  out = str(tmp_path / method)
  job = _job(model_dir, out, method=method, group_size=64, checkpoint_dir=out + ".ckpt")
  report = run_job(job, show_progress=False)
  table = report.table()
  assert "perplexity" in table and method in table
  assert 4.0 < report.bits_per_weight < 4.6
  assert not os.path.exists(out + ".ckpt")  # removed after success
  loaded = load_model(out)
  assert loaded.reference == model_dir
  kernel = loaded.params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert kernel.spec.bits == 4 and kernel.shape == (128, 64)
  assert 0 < report.evaluation.kl_divergence < 1.0
  assert json.dumps(report.as_dict())


def test_bad_job_flags(model_dir, tmp_path):
  with pytest.raises(ValueError, match="--group_size must be one of"):
    _job(model_dir, str(tmp_path / "x"), group_size=100)
  with pytest.raises(ValueError, match="unknown part 'magic'"):
    _job(model_dir, str(tmp_path / "x"), method="magic")


def test_calibration_text_shorter_than_a_sequence_leaves_no_output(model_dir, tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("too short")
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="fewer than one sequence of seqlen=32"):
    run_job(_job(model_dir, out, calib=str(short)), show_progress=False)
  assert not os.path.exists(out)


@pytest.mark.parametrize("method", ["awq+gptq", "rotate+gptq", "rotate+rtn", "lwc"])
def test_composed_schemes_run_end_to_end(model_dir, tmp_path, method):
  out = str(tmp_path / "m")
  report = run_job(_job(model_dir, out, method=method, group_size=32, sym=False), show_progress=False)
  assert 0 < report.evaluation.kl_divergence < 1.0
  loaded = load_model(out)
  assert loaded.params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"].spec.bits == 4
  if method.startswith("rotate"):
    assert not loaded.config.tie_word_embeddings and "lm_head" in loaded.params


def test_awq_scales_before_llama_cpp_encoders(model_dir, tmp_path):
  job = _job(model_dir, str(tmp_path / "g"), method="awq", export="gguf:Q8_0")
  report = run_job(job, show_progress=False)
  assert report.evaluation.kl_divergence < 0.05
  from qjax.pipeline import gguf_path

  assert os.path.exists(gguf_path(job))


def test_awq_only_scales_before_gptq(monkeypatch):
  # Clipping is for round-to-nearest; GPTQ should reconstruct the unclamped weights.
  calls = []
  monkeypatch.setattr(pipeline, "awq", lambda spec, **kw: calls.append(kw))
  QuantizeJob(method="awq+gptq").preparations()
  QuantizeJob(method="awq").preparations()
  assert calls == [{"clip": False}, {"clip": True}]
