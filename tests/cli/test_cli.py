"""The `qjax` command, run as a user runs it: exit status, files, JSON fields, one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest


def qjax(*args, check=True):
  result = subprocess.run(
    [sys.executable, "-c", "from qjax.cli import run; run()", *args],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  if check and result.returncode != 0:
    raise AssertionError(f"qjax {' '.join(args)} failed:\n{result.stderr[-3000:]}")
  return result


def test_help_lists_the_subcommands():
  out = qjax("--help").stdout
  assert all(name in out for name in ("quantize", "eval", "convert", "bench"))
  help_text = qjax("quantize", "--help").stdout
  assert "--group_size" in help_text and "Example" in help_text


def test_quantize_then_eval(model_dir, tmp_path):
  out = str(tmp_path / "gptq")
  qjax("quantize", f"--model={model_dir}", "--nsamples=4", "--seqlen=32", "--eval_windows=2", f"--out={out}")
  report = json.loads(pathlib.Path(out, "report.json").read_text())
  assert report["job"]["method"] == "gptq" and report["evaluation"]["kl_divergence"] > 0
  assert set(os.listdir(out)) >= {"config.json", "model.safetensors", "qjax_quantization.json", "tokenizer.json"}
  result_json = str(tmp_path / "eval.json")
  printed = qjax("eval", f"--model={out}", "--seqlen=32", "--max_windows=2", f"--json={result_json}").stdout
  assert "perplexity" in printed
  evaluation = json.loads(pathlib.Path(result_json).read_text())
  assert evaluation["reference"] == model_dir  # a qjax directory remembers its float model
  assert evaluation["tokens"] == 2 * 31 and evaluation["perplexity"] > 1
  assert {"versions", "tensors", "evaluation", "bits_per_weight"} <= set(report)
  down = report["tensors"]["model/layers_1/mlp/down_proj/kernel"]
  assert down["format"] == "int4 g128" and 0 < down["relative_error"] < 0.5
  assert os.path.exists(os.path.join(out, "errors.png"))
  bench_json = str(tmp_path / "bench.json")
  qjax("bench", f"--model={out}", "--seqlen=16", "--new_tokens=2", "--repeats=1", f"--json={bench_json}")
  bench = json.loads(pathlib.Path(bench_json).read_text())
  assert bench["prefill_tokens_per_s"] > 0 and bench["decode_tokens_per_s"] > 0


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["quantize", "--bits=7"], "flag --bits=7"),
    (["quantize", "--group_size=100"], "--group_size must be one of"),
    (["eval", "--model=/no/such/model"], "/no/such/model: no such model"),
    (["eval", "--seqlen=abc"], "flag --seqlen=abc"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["convert", "--from=/no/such/dir", "--to=gguf:Q4_0"], "/no/such/dir"),
    (["convert", "--from=/tmp", "--to=gguf:Q9_X"], "got 'gguf:Q9_X'"),
    (["convert", "--to=gguf:Q4_0"], "--from must have a value"),
    (["bench", "--model=/no/such/model"], "/no/such/model: no such model"),
    (["bench", "--batch=0"], "--batch must be at least 1"),
  ],
)
def test_bad_input_exits_2_with_one_clear_line(args, message):
  result = qjax(*args, check=False)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert message in lines[0] and lines[0].startswith("qjax")
  assert "Traceback" not in result.stderr
