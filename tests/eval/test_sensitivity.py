"""The allocation's proxy on real weights: the Fisher-weighted rounding error of one linear predicts the KL divergence
that rounding it alone adds to the whole model, in order and in size."""

import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.core.tree import get_path, replace_path
from qjax.eval import evaluate
from qjax.eval.sensitivity import fisher_diagonal, ggml_round_trip, weighted_error
from qjax.formats import open_checkpoint
from qjax.models import logits_fn

PATHS = ["model/layers_0/mlp/down_proj/kernel", "model/layers_3/self_attn/q_proj/kernel",
         "model/layers_8/self_attn/v_proj/kernel", "model/layers_14/mlp/up_proj/kernel",
         "model/layers_20/self_attn/o_proj/kernel", "model/layers_29/mlp/down_proj/kernel"]  # fmt: skip


def _default_model():
  """The default model's float params and config, 8 x 128 calibration windows and 4 x 256 held-out ones."""
  checkpoint = open_checkpoint("default")
  tokenize = lambda part: texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", part))
  calib = texts.calibration_windows(tokenize("calibration"), 8, 128, seed=0)
  held_out = texts.eval_windows(tokenize("evaluation"), 256, max_windows=4)
  return checkpoint.params(), checkpoint.config, calib, held_out


def test_the_kronecker_error_is_the_diagonal_one_for_uncorrelated_inputs_and_a_float64_sum_otherwise():
  from qjax.eval.sensitivity import kronecker_error

  rng = np.random.default_rng(0)
  w, d = rng.normal(size=(48, 16)), rng.normal(size=(48, 16)) * 0.01
  c_diag, f = rng.uniform(0.5, 2, 48), rng.uniform(0, 3, 16)
  fisher = np.outer(c_diag, f)  # what the diagonal of C ⊗ f is
  diagonal = weighted_error(fisher.astype(np.float32), w.astype(np.float32), (w + d).astype(np.float32))
  assert np.isclose(kronecker_error(fisher, np.diag(c_diag), w, w + d), diagonal, rtol=1e-5)
  x = rng.normal(size=(500, 48)) @ rng.normal(size=(48, 48))  # correlated inputs
  c = x.T @ x / 500
  expected = 0.5 * sum(fisher.sum(0)[j] / np.trace(c) * d[:, j] @ c @ d[:, j] for j in range(16))
  assert np.isclose(kronecker_error(fisher, c, w, w + d), expected, rtol=1e-4)


def test_gptqs_error_is_smaller_than_rtns_in_the_kronecker_proxy():
  """On correlated inputs GPTQ moves weights further than RTN (a larger diagonal proxy) yet its output error is
  smaller: the proxy an allocation for GPTQ must use sees that."""
  from qjax.core import QSpec, dequantize, quantize
  from qjax.eval.sensitivity import kronecker_error
  from qjax.quantizers import gptq_quantize

  rng = np.random.default_rng(1)
  x = rng.normal(size=(2048, 64)) @ rng.normal(size=(64, 64)) + rng.normal(size=(2048, 64))
  h = (x.T @ x / len(x)).astype(np.float32)
  w = rng.normal(size=(64, 32)).astype(np.float32)
  fisher = np.outer(np.diag(h), rng.uniform(0.5, 2, 32)).astype(np.float32)
  spec = QSpec(bits=3, group_size=32)
  rtn_w = np.asarray(dequantize(quantize(w, spec)))
  gptq_w = np.asarray(dequantize(gptq_quantize(w, h, spec=spec)[0]))
  assert kronecker_error(fisher, h, w, gptq_w) < 0.7 * kronecker_error(fisher, h, w, rtn_w)
  assert weighted_error(fisher, w, gptq_w) > weighted_error(fisher, w, rtn_w)


@pytest.mark.slow
def test_the_fisher_weighted_error_predicts_each_linears_kl_divergence():
  params, config, calib, held_out = _default_model()
  fisher = fisher_diagonal(config, params, calib, PATHS, batch_size=4)
  reference = logits_fn(config, params)
  predicted, measured = [], []
  for path in PATHS:
    w = get_path(params, path)
    rounded = np.asarray(ggml_round_trip(w, "Q4_0"))  # the default model's weights lie on Q4_1's grid, not Q4_0's
    predicted.append(weighted_error(fisher[path], w, rounded))
    kl = evaluate(logits_fn(config, replace_path(params, path, rounded)), held_out, reference_fn=reference,
                  show_progress=False).kl_divergence  # fmt: skip
    measured.append(kl)
  rank = lambda x: np.argsort(np.argsort(x))
  rho = np.corrcoef(rank(predicted), rank(measured))[0, 1]
  ratio = np.array(measured) / np.array(predicted)
  print("predicted", np.round(predicted, 5), "measured", np.round(measured, 5), f"rank correlation {rho:.2f}")
  assert rho >= 0.8, (predicted, measured)  # the order the allocation spends bits by
  assert np.all((ratio > 0.2) & (ratio < 5)), ratio  # and the size, on text the Fisher never saw


@pytest.mark.slow
def test_allocated_widths_beat_one_width_at_the_same_bits():
  import dataclasses
  import re

  from qjax.core import QSpec
  from qjax.eval.report import sizes
  from qjax.eval.sensitivity import allocate_affine
  from qjax.transforms import Rule, quantize_params, rtn

  params, config, calib, held_out = _default_model()
  spec = QSpec(bits=4, group_size=64)
  uniform_bpw = spec.bits_per_weight(config.hidden_size)  # 4.25: every linear's width is a multiple of 64
  allocation = allocate_affine(config, params, calib, spec=spec, target_bpw=uniform_bpw, batch_size=4)
  assert len(set(allocation.types.values())) > 1 and allocation.bits_per_weight <= uniform_bpw
  for i in range(config.num_hidden_layers):  # q/k/v and gate/up take one width each, as vLLM loads them
    for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
      widths = {t for p, t in allocation.types.items() if re.search(rf"layers_{i}/\w+/({'|'.join(fused)})/", p)}
      assert len(widths) == 1, (i, fused, widths)

  reference = logits_fn(config, params)
  rules = [Rule(re.escape(p), rtn(dataclasses.replace(spec, bits=int(b)))) for p, b in allocation.types.items()]
  mixed = quantize_params(params, rules)
  uniform = quantize_params(params, [Rule(r"model/layers_\d+/.*/kernel", rtn(spec))])
  assert sizes(mixed).quantized <= sizes(uniform).quantized
  kl = {name: evaluate(logits_fn(config, p), held_out, reference_fn=reference, show_progress=False).kl_divergence
        for name, p in (("allocated", mixed), ("uniform", uniform))}  # fmt: skip
  print(kl, allocation.predicted_kl)
  # Measured here: 0.386 against 0.442 with widths 3, 4 and 8 (run with -s to print them).
  assert kl["allocated"] < 0.95 * kl["uniform"], kl


@pytest.mark.slow
def test_widths_allocated_for_gptq_beat_gptq_in_smaller_groups_at_the_same_bits():
  """At 3.5 bits per weight: 3 and 4-bit linears in groups of 64, chosen by GPTQ's own errors, against 3-bit GPTQ in
  groups of 32 (the same bits in one width)."""
  from qjax.calib.quantize import quantize_model
  from qjax.calib.runner import RunnerOptions
  from qjax.core import QSpec
  from qjax.eval.sensitivity import affine_choice, allocate_affine
  from qjax.models import LlamaBlocks
  from qjax.quantizers import GptqConfig
  from qjax.transforms.recipes import gptq

  params, config, calib, held_out = _default_model()
  checkpoint = open_checkpoint("default")
  spec = QSpec(bits=3, group_size=64)
  allocation = allocate_affine(config, params, calib, spec=spec, target_bpw=3.5, gptq_config=GptqConfig(),
                               model=LlamaBlocks(checkpoint))  # fmt: skip
  assert allocation.bits_per_weight <= 3.5 == QSpec(bits=3, group_size=32).bits_per_weight(config.hidden_size)
  chosen = {p: affine_choice(label, spec) for p, label in allocation.types.items()}
  reference = logits_fn(config, params)
  options = RunnerOptions(batch_size=4, show_progress=False)
  kl = {}
  for name, recipe in (("allocated", gptq(spec, overrides=chosen)), ("uniform", gptq(QSpec(bits=3, group_size=32)))):
    qparams = quantize_model(LlamaBlocks(checkpoint), recipe, calib, options=options)
    kl[name] = evaluate(logits_fn(config, qparams), held_out, reference_fn=reference, show_progress=False).kl_divergence
  print(kl, allocation.predicted_kl)
  # Measured here: 0.710 against 1.023 (run with -s to print them).
  assert kl["allocated"] < 0.9 * kl["uniform"], kl
