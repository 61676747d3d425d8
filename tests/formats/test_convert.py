"""Conversion to GGUF: exact block mapping checked by gguf-py, requantization, llama.cpp perplexity, the CLI."""

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, run
from qjax.core import QSpec, dequantize, from_codes, quantize, round_to_grid
from qjax.core.ggml_kquants import encode
from qjax.eval.metrics import evaluate
from qjax.formats import GgufCheckpoint, convert, load_model
from qjax.formats.convert import convert_model, convert_params, exact_blocks, to_ggml
from qjax.formats.targets import Target, parse_target
from qjax.models import logits_fn
from tests.model_factory import write_random_llama


def gguf_py_dequantize(q):
  """gguf-py's own dequantizer of a ggml-layout QArray, in the QArray's logical orientation."""
  rows = gguf.quants.dequantize(np.asarray(q.codes), gguf.GGMLQuantizationType[q.spec.layout])
  return rows.T if q.axis == 0 else rows


def sample(bits, symmetric, group_size=32, shape=(256, 48), seed=0):
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return quantize(w, QSpec(bits=bits, group_size=group_size, symmetric=symmetric))


@pytest.mark.parametrize(
  ("bits", "symmetric", "group_size", "type_name", "exact"),
  [
    (4, False, 32, "Q4_1", True),  # the headline case: only m = -zero*scale is rounded to fp16
    (4, False, 128, "Q4_1", True),  # a group of 128 is four Q4_1 blocks with the same d and m
    (4, True, 32, "Q4_0", True),  # (q - 8) * d bit for bit
    (4, False, 32, "Q4_0", False),  # Q4_0's zero is fixed at 8
    (4, False, 64, "Q5_0", True),  # q - zero + 16 fits 5 bits
    (3, False, -1, "Q4_0", True),
    (5, False, 32, "Q5_1", True),
    (8, True, 32, "Q8_0", True),
    (8, False, 32, "Q8_0", False),  # q - zero leaves int8
    (8, True, 32, "Q4_1", False),
    (4, False, 16, "Q4_1", False),  # two scales per block
  ],
)
def test_exact_mapping_is_what_gguf_py_decodes(bits, symmetric, group_size, type_name, exact):
  q = sample(bits, symmetric, group_size)
  out, row = to_ggml(q, type_name)
  assert (row.exact, row.type_name, out.spec.layout) == (exact, type_name, type_name)
  np.testing.assert_array_equal(gguf_py_dequantize(out), dequantize(out))
  added = np.abs(np.asarray(dequantize(out)) - np.asarray(dequantize(q)))
  assert row.max_abs == pytest.approx(float(added.max()))
  if exact and (symmetric or type_name not in ("Q4_1", "Q5_1")):
    assert row.max_abs == 0.0
  elif exact:  # the fp16 rounding of each block's minimum, at most half an fp16 ulp of it
    m = -np.asarray(q.zero, np.float32) * np.asarray(q.scale, np.float32)
    assert 0 < row.max_abs <= np.max(np.abs(m)) * 2.0**-11 + 1e-6
    assert row.rel_rmse < 1e-3
  else:
    assert row.rel_rmse > 1e-3


def test_act_order_and_k_quants_are_requantized_with_llama_cpp_encoders():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((256, 48)).astype(np.float32)
  spec = QSpec(bits=4, group_size=32, symmetric=False)
  perm = rng.permutation(256)
  codes, params = round_to_grid(w[perm], spec)
  act_order = from_codes(codes, params, spec, perm=perm)
  assert exact_blocks(act_order, "Q4_1") is None
  out, row = to_ggml(act_order, "Q4_1", path="blk")
  assert not row.exact and row.source == "4-bit g32 asym act-order"
  np.testing.assert_array_equal(out.codes, encode(np.asarray(dequantize(act_order)).T, "Q4_1"))
  out, row = to_ggml(sample(4, False), "Q4_K")
  assert not row.exact and out.spec.layout == "Q4_K"
  np.testing.assert_array_equal(out.codes, encode(np.asarray(dequantize(sample(4, False))).T, "Q4_K"))
  _, row = to_ggml(sample(4, False, shape=(96, 48)), "Q4_K")  # rows of 96: llama.cpp falls back to Q5_0
  assert (row.type_name, row.exact) == ("Q5_0", True)


def test_parse_target():
  assert parse_target("gguf:Q4_1", flag="--to") == Target("gguf", "Q4_1")
  assert parse_target("gptq_v2") == Target("gptq_v2")
  assert parse_target("gguf:F16") == Target("gguf", "F16")
  assert parse_target("gguf:Q4_K_M") == Target("gguf", "Q4_K_M")  # one meaning: what llama-quantize takes
  assert parse_target(None) == Target("qjax")
  for bad in ("gguf:Q4_K", "gguf", "exl2", "awq:gemm"):
    with pytest.raises(ValueError, match=r"--to expected gguf:<TYPE> \(TYPE one of Q4_0, .*\) or one of gptq"):
      parse_target(bad, flag="--to")


def qjax_cli(*args):
  return subprocess.run(
    [sys.executable, "-c", "from qjax.cli import run; run()", *args],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
  """`qjax quantize --export=gptq` of a small random model (RTN 4-bit g32 asymmetric), run as a user runs it."""
  model = write_random_llama(str(tmp_path_factory.mktemp("llama")), layers=2, hidden=64, intermediate=128)
  out = str(tmp_path_factory.mktemp("gptq") / "gptq")
  result = qjax_cli("quantize", f"--model={model}", "--method=rtn", "--group_size=32", "--nosym", "--export=gptq",
                    "--eval_windows=0", f"--out={out}")  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"wrote {out}" in result.stdout
  return out


def test_convert_gptq_to_gguf_and_awq(gptq_dir, tmp_path):
  path = str(tmp_path / "m.gguf")
  report = convert_model(gptq_dir, Target("gguf", "Q4_1"), path)
  assert len(report) == 14 and all(r.exact and r.type_name == "Q4_1" for r in report)
  source = load_model(gptq_dir)
  back = GgufCheckpoint(path)
  np.testing.assert_allclose(
    back.layer_params(1)["mlp"]["down_proj"]["kernel"],
    dequantize(source.params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]),
    atol=max(r.max_abs for r in report),
    rtol=0,
  )
  np.testing.assert_array_equal(back.embed_params()["embedding"], source.params["model"]["embed_tokens"]["embedding"])
  assert "copied" in convert.summary(report)
  dequantized, report = convert_params(source.params, "F32", source.config)
  assert all(r.max_abs == 0 for r in report) and isinstance(dequantized["lm_head"]["kernel"], np.ndarray)
  awq_dir = str(tmp_path / "awq")
  convert_model(gptq_dir, Target("awq"), awq_dir)
  a = load_model(awq_dir).params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  b = source.params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(dequantize(a), dequantize(b))


def test_cli(gptq_dir, tmp_path):
  out = str(tmp_path / "cli.gguf")
  result = qjax_cli("convert", f"--from={gptq_dir}", "--to=gguf:Q4_0", f"--out={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "4-bit g32 asym" in result.stdout and "requantized" in result.stdout and os.path.exists(out)
  result = qjax_cli("convert", f"--from={gptq_dir}", "--to=gguf:Q4_X")
  assert result.returncode == 2 and result.stderr.startswith("qjax convert: error: --to expected gguf:<TYPE>")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gptq_w4g32_to_q4_1_in_llama_cpp(tmp_path):
  """The default model as GPTQ 4-bit g32 (asymmetric), converted to Q4_1: llama.cpp's perplexity equals the GPTQ
  model's up to fp16 rounding of the block minima (and llama.cpp's own 8-bit activations)."""
  llama_cpp = pytest.importorskip("llama_cpp")
  source = str(tmp_path / "gptq")
  run(Settings(method="rtn", bits=4, group_size=32, sym=False, export="gptq", eval_windows=0, out=source),
      show_progress=False)  # fmt: skip
  path = str(tmp_path / "model-Q4_1.gguf")
  report = convert_model(source, Target("gguf", "Q4_1"), path)
  assert all(r.exact for r in report) and len(report) == 30 * 7
  print(convert.summary(report))

  gptq_model = load_model(source)
  tokens = texts.tokenize(gptq_model.tokenizer, texts.load_text("default", "evaluation"))
  windows = texts.eval_windows(tokens, 128, max_windows=3)
  ppl_gptq = evaluate(logits_fn(gptq_model.config, gptq_model.params), windows, show_progress=False).perplexity
  converted = GgufCheckpoint(path)
  ppl_gguf = evaluate(logits_fn(converted.config, converted.params()), windows, show_progress=False).perplexity
  llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_batch=128, logits_all=True, verbose=False)
  try:
    nll = 0.0
    for w in windows:
      llm.reset()
      llm.eval(w.tolist())
      logits = np.asarray(llm.scores[: len(w)], np.float64)[:-1]
      logits -= logits.max(-1, keepdims=True)
      logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
    ppl_llama = float(np.exp(nll / windows[:, 1:].size))
  finally:
    llm.close()
  print(
    f"perplexity: GPTQ (qjax) {ppl_gptq:.4f}, GGUF Q4_1 (qjax) {ppl_gguf:.4f}, GGUF Q4_1 (llama.cpp) {ppl_llama:.4f}"
  )
  assert abs(ppl_gguf - ppl_gptq) / ppl_gptq < 1e-3  # only the fp16 minima differ
  assert abs(ppl_llama - ppl_gptq) / ppl_gptq < 1e-2  # plus llama.cpp's arithmetic
