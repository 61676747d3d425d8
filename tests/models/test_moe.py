"""Mixtures of experts (Mixtral, Qwen3-MoE): routing and grouped matmuls against a float64 reference, logits
equal to transformers' through qjax's loader, calibration per expert, exports that read back."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.core.grouped import group_by_expert, grouped_gram
from qjax.kernels.grouped import grouped_matmul
from qjax.models.blocks import LlamaBlocks
from qjax.models.llama import DecoderLayer
from qjax.models.moe import route
from qjax.transforms.capture import module_call
from tests.model_factory import assert_logits_match_transformers, write_random_moe


def test_grouped_matmuls_are_each_tokens_experts_and_both_methods_agree():
  """Each row through its expert's kernel, and each expert's Gram matrix of its rows, against float64."""
  rng = np.random.default_rng(0)
  n, d, f, e, k = 37, 16, 24, 6, 3
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(e, d, f)).astype(np.float32)
  weights, experts = route(jnp.asarray(rng.normal(size=(n, e)) * 3, jnp.float32), k, normalize=True)
  experts = np.asarray(experts)
  assert (np.sort(experts, axis=1)[:, 1:] != np.sort(experts, axis=1)[:, :-1]).all()  # k distinct experts
  np.testing.assert_allclose(np.asarray(weights).sum(1), 1, rtol=1e-6)
  rows, row_of_pair = group_by_expert(jnp.asarray(x), jnp.asarray(experts), e)
  assert np.asarray(rows.group_sizes).tolist() == np.bincount(experts.ravel(), minlength=e).tolist()
  want = np.einsum("nd,nkdf->nkf", x.astype(np.float64), w.astype(np.float64)[experts])
  pair_x, pair_expert = np.repeat(x.astype(np.float64), k, axis=0), experts.ravel()
  grams = np.stack([pair_x[pair_expert == j].T @ pair_x[pair_expert == j] for j in range(e)])
  for method in ("tiles", "ragged"):
    got = np.asarray(grouped_matmul(rows, jnp.asarray(w), method=method))[np.asarray(row_of_pair)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grouped_gram(rows, method=method)), grams, rtol=1e-5, atol=1e-4)
  # Rows that belong to no pair are padding: zero.
  used = np.zeros(rows.x.shape[0], bool)
  used[np.asarray(row_of_pair).ravel()] = True
  assert not np.asarray(rows.x)[~used].any()


@pytest.mark.parametrize(
  "family,kwargs",
  [
    ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # Dense layers between sparse ones (layer 0 listed, layer 2 skipped by the step), 3 of 5 experts per token,
    # the chosen probabilities left unnormalised.
    (
      "Qwen3Moe",
      dict(
        num_experts=5,
        num_experts_per_tok=3,
        moe_intermediate_size=48,
        mlp_only_layers=[0],
        decoder_sparse_step=2,
        norm_topk_prob=False,
        layers=4,
      ),
    ),
    ("Qwen3Moe", dict(num_experts=8, num_experts_per_tok=1, moe_intermediate_size=32, norm_topk_prob=True)),
  ],
  ids=["mixtral", "qwen3moe-dense-layers-odd-k", "qwen3moe-top1"],
)
def test_moe_logits_match_transformers(tmp_path, family, kwargs):
  path = write_random_moe(str(tmp_path / "moe"), family=family, **kwargs)
  tokens = texts.tokenize(texts_tokenizer(path), texts.load_text("default", "evaluation"))[:40]
  checkpoint = assert_logits_match_transformers(path, np.asarray(tokens)[None], family)
  config = checkpoint.config
  assert config.num_experts == (kwargs.get("num_experts") or kwargs["num_local_experts"])
  if family == "Qwen3Moe" and "mlp_only_layers" in kwargs:
    assert config.dense_layers == (0, 2) and [config.moe(i) for i in range(4)] == [False, True, False, True]
    assert "experts" not in checkpoint.layer_params(0)["mlp"]
  block = checkpoint.layer_params(1)["mlp"]
  assert block["experts"]["down_proj"]["kernel"].shape == (config.num_experts, config.expert_size, 64)


def texts_tokenizer(path):
  from qjax.formats import open_checkpoint

  return open_checkpoint(path).tokenizer()


@pytest.fixture(scope="module")
def qwen_moe(tmp_path_factory):
  """A random Qwen3-MoE: 8 experts, 2 per token, layer 0 dense."""
  return write_random_moe(str(tmp_path_factory.mktemp("qwen3moe")), family="Qwen3Moe", layers=2, num_experts=8,
                          num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0])  # fmt: skip


def _float_expert_inputs(checkpoint, windows):
  """Inputs of layer 1's experts on the float model (float64 reference): per expert, the rows routed to it."""
  blocks = LlamaBlocks(checkpoint)
  h = blocks.embed(blocks.embed_params(), jnp.asarray(windows))
  h = blocks.layer_fn(0)(checkpoint.layer_params(0), h)
  p = checkpoint.layer_params(1)
  cfg = checkpoint.config
  # The layer's attention half, then the MLP norm: what the experts' gate/up read.
  layer = DecoderLayer(cfg, moe=True)
  run, _ = module_call(
    lambda params, hh: layer.apply({"params": params}, hh, jnp.broadcast_to(jnp.arange(hh.shape[1]), hh.shape[:2])),
    "mlp",
  )
  (mlp_in,), _, _ = run(p, h)
  x = np.asarray(mlp_in, np.float64).reshape(-1, cfg.hidden_size)
  logits = x @ np.asarray(p["mlp"]["gate"]["kernel"], np.float64)
  top = np.argsort(-logits, axis=1)[:, : cfg.num_experts_per_tok]
  return [x[(top == e).any(axis=1)] for e in range(cfg.num_experts)]


def test_expert_statistics_come_from_the_tokens_routed_to_each_expert(qwen_moe):
  from qjax.calib.experts import ExpertPolicy
  from qjax.calib.runner import RunnerOptions, quantize_blocks
  from qjax.core import QSpec
  from qjax.formats import open_checkpoint
  from qjax.models.blocks import LlamaBlocks
  from qjax.transforms.methods import gptq
  from qjax.transforms.rules import rules_transform
  from tests.model_factory import random_windows

  checkpoint = open_checkpoint(qwen_moe)
  windows = random_windows(4, 16)
  seen = {}

  def spy(params, state, **extra):
    for path, s in extra.get("stats", {}).items():
      seen[path] = s
    return params, state

  from qjax.transforms.base import Transform

  spy_stage = Transform(lambda _: None, spy, frozenset({"hessian"}))
  counts = {}
  options = RunnerOptions(batch_size=2, show_progress=False, float_inputs=True,
                          experts=ExpertPolicy(kind="plain"), expert_tokens=counts.__setitem__)  # fmt: skip
  quantize_blocks(LlamaBlocks(checkpoint), [spy_stage], windows, options=options)
  rows = _float_expert_inputs(checkpoint, windows)
  stats = seen["model/layers_1/mlp/experts/gate_proj/kernel"]
  assert np.asarray(stats["tokens"]).tolist() == [len(r) for r in rows] == counts["model/layers_1/mlp/experts"].tolist()
  for e, x in enumerate(rows):
    if len(x):
      np.testing.assert_allclose(stats["hessian"][e], x.T @ x / len(x), rtol=2e-4, atol=1e-5)
  del gptq, rules_transform, QSpec


@pytest.mark.parametrize("policy", ["shrink", "plain", "rtn", "all_tokens"])
def test_gptq_with_experts_that_see_no_tokens(tmp_path, policy):
  """A calibration of 6 tokens, top-1 of 8 experts: at most 6 experts see any. Every expert ends quantized in the
  same scheme, finite, and the counts name those that saw nothing; the quantized model runs."""
  from qjax.calib.experts import ExpertPolicy
  from qjax.calib.quantize import quantize_model
  from qjax.calib.runner import RunnerOptions
  from qjax.core import QSpec, dequantize, is_qarray
  from qjax.formats import open_checkpoint
  from qjax.models import logits_fn
  from qjax.transforms.recipes import gptq
  from tests.model_factory import random_windows

  path = write_random_moe(str(tmp_path / "mixtral"), family="Mixtral", layers=2, num_local_experts=8,
                          num_experts_per_tok=1)  # fmt: skip
  checkpoint = open_checkpoint(path)
  counts = {}
  options = RunnerOptions(batch_size=1, show_progress=False, experts=ExpertPolicy(kind=policy),
                          expert_tokens=counts.__setitem__)  # fmt: skip
  spec = QSpec(bits=4, group_size=32)
  qparams = quantize_model(LlamaBlocks(checkpoint), gptq(spec), random_windows(1, 6), options=options)
  for i in range(2):
    tokens = counts[f"model/layers_{i}/mlp/experts"]
    assert tokens.sum() == 6 and (tokens == 0).any()
    experts = qparams["model"][f"layers_{i}"]["mlp"]["experts"]
    for name in ("gate_proj", "up_proj", "down_proj"):
      q = experts[name]["kernel"]
      assert is_qarray(q) and q.spec == spec and q.stack_shape == (8,)
      w = np.asarray(dequantize(q))
      assert np.isfinite(w).all() and w.shape == checkpoint.layer_params(i)["mlp"]["experts"][name]["kernel"].shape
      assert (np.abs(w).reshape(8, -1).max(axis=1) > 0).all()  # no expert zeroed
    assert not is_qarray(qparams["model"][f"layers_{i}"]["mlp"]["gate"]["kernel"])  # the router stays in float
  from qjax.eval.report import RunReport, sizes

  table = RunReport("gptq", None, sizes(qparams), 0.0, 0.0, [], {p: list(t) for p, t in counts.items()}).table()
  for path, tokens in counts.items():  # the printed summary names every expert that saw no token
    unseen = ", ".join(str(e) for e in np.flatnonzero(tokens == 0))
    assert f"{path}: " in table and f"saw none: {unseen})" in table
  ids = jnp.asarray(random_windows(1, 12))
  logits = np.asarray(logits_fn(checkpoint.config, qparams)(ids))
  reference = np.asarray(logits_fn(checkpoint.config, checkpoint.params())(ids))
  assert np.isfinite(logits).all() and np.abs(logits - reference).max() < 0.5 * np.abs(reference).max()


@pytest.mark.parametrize("family,fmt", [("Mixtral", "gptq"), ("Qwen3Moe", "awq"), ("Qwen3Moe", "compressed-tensors")])
def test_hf_export_of_experts_reads_back(tmp_path, family, fmt):
  """A GPTQ or AWQ export names each expert as the family's checkpoints do (Mixtral's w1/w2/w3 under
  block_sparse_moe) and qjax's importer stacks them back to the same values."""
  from safetensors import safe_open

  from qjax.calib.quantize import quantize_model
  from qjax.calib.runner import RunnerOptions
  from qjax.core import QSpec, dequantize
  from qjax.formats import export, load_model, open_checkpoint, parse_target
  from qjax.transforms.recipes import rtn

  kwargs = dict(num_local_experts=4) if family == "Mixtral" else dict(num_experts=4, moe_intermediate_size=32)
  path = write_random_moe(str(tmp_path / "moe"), family=family, num_experts_per_tok=2, **kwargs)
  checkpoint = open_checkpoint(path)
  spec = QSpec(bits=4, group_size=32, symmetric=fmt != "awq")
  qparams = quantize_model(LlamaBlocks(checkpoint), rtn(spec), options=RunnerOptions(show_progress=False))
  out = str(tmp_path / fmt)
  export(parse_target(fmt), out, checkpoint.config, qparams, checkpoint.tokenizer(), name="moe")
  with safe_open(f"{out}/model.safetensors", "np") as f:
    names = set(f.keys())
  module, down = ("block_sparse_moe", "w2") if family == "Mixtral" else ("mlp", "down_proj")
  packed = "weight_packed" if fmt == "compressed-tensors" else "qweight"
  assert f"model.layers.1.{module}.experts.3.{down}.{packed}" in names
  if fmt == "compressed-tensors":  # the routers are Linears that stay dense: listed in `ignore` for vLLM
    with open(f"{out}/config.json") as f:
      ignore = json.load(f)["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
  assert f"model.layers.1.{module}.gate.weight" in names
  back = load_model(out).params
  for i in range(2):
    for p in ("gate_proj", "up_proj", "down_proj"):
      ours = qparams["model"][f"layers_{i}"]["mlp"]["experts"][p]["kernel"]
      theirs = back["model"][f"layers_{i}"]["mlp"]["experts"][p]["kernel"]
      np.testing.assert_allclose(np.asarray(dequantize(theirs)), np.asarray(dequantize(ours)), rtol=1e-3, atol=1e-4)


def test_rotations_are_refused_by_the_plan_on_experts():
  """Before any work: a rotation folds into dense MLPs only."""
  from qjax.cli.quantize import Settings, plan
  from qjax.models import LlamaConfig

  config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, architecture="MixtralForCausalLM", num_experts=4,
                       num_experts_per_tok=2)  # fmt: skip
  with pytest.raises(ValueError, match="mixture-of-experts"):
    plan(Settings(method="rotate+gptq", group_size=32, sym=True), config, method_given=True)


def _with_outlier_channels(path: str) -> str:
  """The checkpoint at `path` with four channels of every MLP norm 20x: the experts' inputs get the salient
  channels AWQ protects."""
  import safetensors.numpy

  weights = os.path.join(path, "model.safetensors")
  tensors = dict(safetensors.numpy.load_file(weights))
  for name, t in tensors.items():
    if name.endswith("post_attention_layernorm.weight"):
      tensors[name] = np.concatenate([t[:4] * 20, t[4:]])
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  return path


def test_awq_on_experts_folds_exactly_and_beats_rtn(tmp_path):
  """AutoAWQ's Mixtral scheme: the norm's scales over every expert's gate/up with the float router absorbing them
  (the folded float model computes the same logits), each expert's up -> down scales on its own rows, an expert
  calibration never reached left as it was; then AWQ + RTN beats RTN at 3 bits, and learned clipping runs too."""
  from qjax.calib.quantize import quantize_model
  from qjax.calib.runner import RunnerOptions
  from qjax.core import QSpec
  from qjax.formats import open_checkpoint
  from qjax.models import logits_fn
  from qjax.transforms import Rule, quantize_params, recipes, rtn
  from qjax.transforms.awq import awq as awq_scaling
  from qjax.transforms.lwc import learned_clipping
  from qjax.transforms.recipes import Recipe
  from tests.model_factory import random_windows

  path = write_random_moe(str(tmp_path / "moe"), family="Mixtral", num_local_experts=8, num_experts_per_tok=1)
  checkpoint = open_checkpoint(_with_outlier_channels(path))
  float_params = checkpoint.params()
  spec, options = QSpec(bits=3, group_size=32), RunnerOptions(show_progress=False)
  counts = {}
  few = RunnerOptions(show_progress=False, expert_tokens=counts.__setitem__)
  folded = quantize_model(LlamaBlocks(checkpoint), Recipe((awq_scaling(spec, n_grid=4),), "awq"),
                          random_windows(1, 4), options=few)  # fmt: skip
  for i in range(2):
    ours, theirs = folded["model"][f"layers_{i}"]["mlp"], float_params["model"][f"layers_{i}"]["mlp"]
    assert not np.allclose(ours["gate"]["kernel"], theirs["gate"]["kernel"])  # the router absorbed the scales
    for e in np.flatnonzero(counts[f"model/layers_{i}/mlp/experts"] == 0):
      np.testing.assert_array_equal(
        ours["experts"]["down_proj"]["kernel"][e], theirs["experts"]["down_proj"]["kernel"][e]
      )
  windows, ids = random_windows(4, 64), jnp.asarray(random_windows(2, 64, seed=7))
  scaling = awq_scaling(spec, clip=False, n_grid=10)
  scaled = quantize_model(LlamaBlocks(checkpoint), Recipe((scaling,), "awq"), windows, options=options)
  reference = np.asarray(logits_fn(checkpoint.config, float_params)(ids))
  np.testing.assert_allclose(np.asarray(logits_fn(checkpoint.config, scaled)(ids)), reference,
                             atol=1e-4 * np.abs(reference).max())  # fmt: skip

  def kl(params):
    p, q = (jax.nn.log_softmax(logits_fn(checkpoint.config, x)(ids)) for x in (float_params, params))
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))

  # Round-to-nearest needs no calibration: AWQ + RTN is the scaled float model, rounded.
  rounding = [Rule(r"model/layers_\d+/.*_proj/kernel", rtn(spec))]
  lwc = Recipe((learned_clipping(spec, steps=4),), "lwc") + recipes.rtn(spec)
  kls = {
    "rtn": kl(quantize_params(float_params, rounding)),
    "awq (scales only)": kl(quantize_params(scaled, rounding)),
    "lwc": kl(quantize_model(LlamaBlocks(checkpoint), lwc, windows, options=options)),
  }
  print(f"3-bit g32 on a Mixtral with outlier channels, KL divergence: {kls}")
  assert kls["awq (scales only)"] < 0.95 * kls["rtn"] and np.isfinite(kls["lwc"])


def test_hostile_expert_counts_are_refused_before_any_tensor_list(tmp_path):
  from qjax.core.errors import InputError
  from qjax.models import LlamaConfig

  hf = {
    "architectures": ["MixtralForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_local_experts": 2**31 - 1,
    "num_experts_per_tok": 2,
  }
  with pytest.raises(InputError, match="num_local_experts expected at most 4096"):
    LlamaConfig.from_hf_dict(hf)
  with pytest.raises(InputError, match="num_experts_per_tok=9 expected at most num_local_experts=8"):
    LlamaConfig.from_hf_dict({**hf, "num_local_experts": 8, "num_experts_per_tok": 9})
