"""AWQ (gemm) checkpoints: exact round trips, the interleaved layout, transformers as a loader, bad input."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, plan, run
from qjax.core import QSpec, dequantize, from_codes, is_qarray, quantize, round_to_grid
from qjax.core.tree import leaves_with_paths
from qjax.eval.metrics import evaluate
from qjax.formats import load_model, open_checkpoint
from qjax.formats.awq import from_awq, load_awq, save_awq, to_awq
from qjax.models import logits_fn
from tests.model_factory import LINEARS, quantized_params

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # formats.md §2.2: channel 8c + m sits in nibble AWQ_REVERSE_ORDER[m]


def assert_same_qarray(a, b):
  for field in ("codes", "scale", "zero", "perm"):
    x, y = getattr(a, field), getattr(b, field)
    assert (x is None) == (y is None), field
    if x is not None:
      assert np.asarray(x).dtype == np.asarray(y).dtype, field
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=field)
  assert (a.spec, a.shape, a.dtype, a.axis) == (b.spec, b.shape, b.dtype, b.axis)


def sample(group_size, symmetric, shape=(128, 48), seed=0):
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return quantize(w, QSpec(bits=4, group_size=group_size, symmetric=symmetric))


@pytest.mark.parametrize("symmetric", [False, True], ids=["zero_point", "sym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_round_trip_is_exact(group_size, symmetric):
  q = sample(group_size, symmetric)
  t = to_awq(q)
  groups = 1 if group_size == -1 else 128 // group_size
  assert (t.qweight.shape, t.qzeros.shape, t.scales.shape) == ((128, 6), (groups, 6), (groups, 48))
  assert_same_qarray(from_awq(t, group_size=group_size, zero_point=not symmetric), q)


def unpack_awq(words):
  """AutoAWQ's `unpack_awq` + `reverse_awq_order`, written from the format description."""
  shifts = np.arange(8, dtype=np.uint32) * 4
  nibbles = (words.view(np.uint32)[..., None] >> shifts) & 15  # (..., words, slot)
  return nibbles[..., AWQ_REVERSE_ORDER].reshape(*words.shape[:-1], -1)


def test_layout_matches_autoawq_dequantization():
  q = sample(32, False)
  t = to_awq(q)
  codes, zeros = unpack_awq(t.qweight), unpack_awq(t.qzeros)
  groups = np.arange(128) // 32
  w = (codes.astype(np.float32) - zeros[groups]) * t.scales.astype(np.float32)[groups]
  np.testing.assert_array_equal(w, dequantize(q))
  # Slot 1 of word 0 holds output channel 2 (AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7).
  np.testing.assert_array_equal((t.qweight.view(np.uint32)[:, 0] >> 4) & 15, codes[:, 2])


def test_symmetric_is_written_with_zero_points_8():
  t = to_awq(sample(64, True))
  assert (t.qzeros.view(np.uint32) == 0x88888888).all()
  with pytest.raises(ValueError, match="zero_point=false but the zero points are not all 8"):
    from_awq(to_awq(sample(64, False)), group_size=64, zero_point=False, name="model.layers.0.mlp.up_proj")


def test_what_the_gemm_layout_cannot_hold_is_refused():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((128, 48)).astype(np.float32)
  spec = QSpec(bits=4, group_size=32, symmetric=False)
  codes, params = round_to_grid(w, spec)
  with pytest.raises(ValueError, match="AWQ has no g_idx"):
    to_awq(from_codes(codes, params, spec, perm=rng.permutation(128)))
  with pytest.raises(ValueError, match="AWQ's gemm layout is 4-bit"):
    to_awq(quantize(w, QSpec(bits=3, group_size=32)))
  with pytest.raises(ValueError, match="AWQ has no partial groups"):
    to_awq(quantize(w, QSpec(bits=4, group_size=48, partial_groups=True)), name="x")
  with pytest.raises(ValueError, match="multiple of 8, got 12"):
    to_awq(quantize(w[:, :12], QSpec(bits=4, group_size=32)))


def test_directory_round_trip_and_config(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32, symmetric=False))
  out = str(tmp_path / "awq")
  save_awq(out, checkpoint.config, params, checkpoint.tokenizer())
  with open(os.path.join(out, "config.json")) as f:
    qc = json.load(f)["quantization_config"]
  assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None, "desc_act": False}  # fmt: skip
  config, back = load_awq(out)
  assert config == checkpoint.config
  original = dict(leaves_with_paths(params))
  for path, leaf in leaves_with_paths(back):
    if is_qarray(leaf):
      assert_same_qarray(leaf, original[path])
  assert load_model(out).params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"].spec == QSpec(
    bits=4, group_size=32, symmetric=False
  )


def test_bad_inputs(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32, symmetric=False))
  out = str(tmp_path / "awq")
  save_awq(out, checkpoint.config, params, None)
  path = os.path.join(out, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["quantization_config"]["version"] = "gemv"
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="unknown AWQ version 'gemv'"):
    load_model(out)
  config["quantization_config"].update(version="gemm", group_size=64)
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"qzeros: expected shape \(1, 8\).*does not describe"):
    load_model(out)
  _, with_head = quantized_params(model_dir, QSpec(bits=4, group_size=32, symmetric=False), LINEARS + "|lm_head/kernel")
  with pytest.raises(ValueError, match="keeps lm_head dense"):
    save_awq(str(tmp_path / "head"), checkpoint.config, with_head, None)


def test_export_flags_are_checked_before_quantizing(model_dir):
  config = open_checkpoint(model_dir).config
  with pytest.raises(ValueError, match="--export=awq stores 4-bit codes, got --bits=3"):
    plan(Settings(method="rtn", bits=3, group_size=32, export="awq"), config)
  with pytest.raises(ValueError, match="no g_idx for act-order"):
    plan(Settings(method="gptq", desc_act=True, group_size=32, export="awq"), config)
  plan(Settings(method="gptq", desc_act=True, static_groups=True, group_size=32, export="awq"), config)
  s = Settings(model=model_dir, method="rtn", group_size=128, export="awq", eval_windows=0)
  with pytest.raises(ValueError, match=r"--group_size=128: 128 does not divide in=64 .*\[16, 32, 64, -1\]"):
    plan(s, config)
  with pytest.raises(ValueError, match="128 does not divide in=64"):
    run(s, show_progress=False)


def hf_logits(model, windows):
  import torch

  with torch.no_grad():
    return model(torch.tensor(np.asarray(windows), dtype=torch.long)).logits.float().numpy()


def perplexity(logits, windows):
  return evaluate(lambda ids: jnp.asarray(logits), windows, batch_size=len(windows), show_progress=False).perplexity


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
@pytest.mark.parametrize(
  ("model", "group_size", "sym"), [("default", 64, False), ("random", 32, True)], ids=["default_zero_point", "sym"]
)
def test_transformers_loads_the_export(model, group_size, sym, model_dir, tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("gptqmodel")
  from transformers import AutoModelForCausalLM

  out = str(tmp_path / "awq")
  source = "default" if model == "default" else model_dir
  s = Settings(model=source, method="rtn", bits=4, group_size=group_size, sym=sym, export="awq", eval_windows=0,
               out=out)  # fmt: skip
  run(s, show_progress=False)
  ours = load_model(out)
  tokens = texts.tokenize(ours.tokenizer, texts.load_text("default", "evaluation"))
  windows = texts.eval_windows(tokens, 64, max_windows=2)
  mine = np.asarray(logits_fn(ours.config, ours.params)(jnp.asarray(windows)))
  theirs = hf_logits(AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32), windows)
  diff, scale = np.abs(theirs - mine).max(), np.abs(mine).max()
  ppl_theirs, ppl_ours = perplexity(theirs, windows), perplexity(mine, windows)
  print(f"AWQ {model} g{group_size} sym={sym}: max |Δlogit| {diff:.4f} (max |logit| {scale:.2f}); "
        f"perplexity transformers {ppl_theirs:.4f} qjax {ppl_ours:.4f}")  # fmt: skip
  assert diff < 3e-3 * scale
  assert abs(ppl_theirs - ppl_ours) / ppl_ours < 1e-3
