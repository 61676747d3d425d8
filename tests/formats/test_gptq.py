"""GPTQ checkpoints: exact round trips, the on-disk layout, real loaders (transformers, GPTQModel), bad input."""

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, plan, run
from qjax.core import QSpec, dequantize, from_codes, is_qarray, quantize, round_to_grid
from qjax.core.tree import leaves_with_paths, map_with_path
from qjax.eval.metrics import evaluate
from qjax.formats import export, load_model, open_checkpoint, parse_target, shards
from qjax.formats.gptq import canonical_act_order, from_gptq, load_gptq, save_gptq, to_gptq
from qjax.models import logits_fn
from qjax.quantizers import GptqConfig, gptq_quantize
from qjax.transforms import Rule, quantize_params, rtn
from tests.model_factory import LINEARS, quantize_like_cli, quantized_params

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel's worker pool needs it on small machines

K, N = 192, 32  # 3-bit packing needs multiples of 32 on both axes


def assert_same_qarray(a, b):
  for field in ("codes", "scale", "zero", "perm"):
    x, y = getattr(a, field), getattr(b, field)
    assert (x is None) == (y is None), field
    if x is not None:
      assert np.asarray(x).dtype == np.asarray(y).dtype, field
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=field)
  assert (a.spec, a.shape, a.dtype, a.axis) == (b.spec, b.shape, b.dtype, b.axis)


def assert_reads_back(params, loaded_params, *, dense_atol: float | None = None) -> None:
  """An export's params read back: every quantized leaf identical (act-order groups in GPTQ's canonical order; groups
  that divide every width, so `partial_groups` is whatever the reader says), dense leaves within `dense_atol`."""
  for (path, a), (_, b) in zip(leaves_with_paths(params), leaves_with_paths(loaded_params), strict=True):
    if is_qarray(a):
      a = canonical_act_order(a) if a.perm is not None else a
      spec = dataclasses.replace(a.spec, partial_groups=b.spec.partial_groups)
      assert_same_qarray(b, dataclasses.replace(a, spec=spec))
    elif dense_atol is not None:
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=dense_atol, err_msg=path)


def act_order_qarray(w, spec, perm):
  """An act-order QArray as GPTQ makes it: codes and groups in `perm` order (row r holds input perm[r])."""
  codes, params = round_to_grid(w[perm], spec)
  return from_codes(codes, params, spec, perm=perm)


def sample_qarray(bits, group_size, symmetric, act_order, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((K, N)).astype(np.float32)
  spec = QSpec(bits=bits, group_size=group_size, symmetric=symmetric, partial_groups=True)
  return act_order_qarray(w, spec, rng.permutation(K)) if act_order else quantize(w, spec)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["static", "act_order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1], ids=["g32", "g64", "g128_partial", "per_channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_is_exact(bits, group_size, symmetric, act_order, checkpoint_format):
  q = sample_qarray(bits, group_size, symmetric, act_order)
  t = to_gptq(q, checkpoint_format=checkpoint_format)
  assert t.qweight.shape == (K * bits // 32, N) and t.qweight.dtype == np.int32
  assert t.qzeros.shape == (q.scale.shape[0], N * bits // 32) and t.scales.dtype == np.float16
  back = from_gptq(t, bits=bits, group_size=group_size, sym=symmetric, checkpoint_format=checkpoint_format)
  # g_idx keeps each input's group but not the order inside a group: the round trip returns that canonical form.
  assert_same_qarray(back, canonical_act_order(q))
  np.testing.assert_array_equal(dequantize(back), dequantize(q))
  if not act_order:
    assert_same_qarray(back, q)
  assert (back.perm is not None) == (act_order and group_size != -1)


def test_layout_matches_the_loaders_formula():
  """Unpacked by hand as every loader does: W.T[i, j] = scales[g_idx[i], j] * (q[i, j] - (qzeros[g_idx[i], j] + 1))."""
  q = sample_qarray(4, 32, False, act_order=True)
  t = to_gptq(q)
  shifts = np.arange(8, dtype=np.uint32) * 4
  codes = ((t.qweight.view(np.uint32)[:, None, :] >> shifts[None, :, None]) & 15).reshape(K, N)
  zeros = ((t.qzeros.view(np.uint32)[:, :, None] >> shifts) & 15).reshape(-1, N) + 1
  w = t.scales.astype(np.float32)[t.g_idx] * (codes.astype(np.float32) - zeros[t.g_idx])
  np.testing.assert_array_equal(w, dequantize(q))
  assert not np.all(np.diff(t.g_idx) >= 0)  # act-order: g_idx is not monotonic


def test_symmetric_zero_words_are_the_known_constants():
  expected = {2: 0x55555555, 4: 0x77777777, 8: 0x7F7F7F7F}
  for bits, word in expected.items():
    t = to_gptq(sample_qarray(bits, 64, True, False))
    assert (t.qzeros.view(np.uint32) == word).all()
  v2 = to_gptq(sample_qarray(4, 64, True, False), checkpoint_format="gptq_v2")
  assert (v2.qzeros.view(np.uint32) == 0x88888888).all()
  three = to_gptq(sample_qarray(3, 64, True, False)).qzeros.view(np.uint32)[0, :3]
  assert [hex(int(x)) for x in three] == ["0xdb6db6db", "0xb6db6db6", "0x6db6db6d"]


def test_zero_point_zero_is_refused_in_v1_and_kept_in_v2():
  w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
  w[:32, 0] = np.abs(w[:32, 0])  # a group without negative weights: its zero point is 0
  q = quantize(w, QSpec(bits=4, group_size=32, symmetric=False))
  assert int(q.zero[0, 0]) == 0
  with pytest.raises(ValueError, match=r"1 group\(s\) have the zero point 0.*checkpoint_format='gptq_v2'"):
    to_gptq(q, name="model.layers.0.mlp.up_proj")
  back = from_gptq(to_gptq(q, checkpoint_format="gptq_v2"), bits=4, group_size=32, sym=False,
                   checkpoint_format="gptq_v2")  # fmt: skip
  assert_same_qarray(back, dataclasses.replace(q, spec=dataclasses.replace(q.spec, partial_groups=True)))


def test_gptqmodel_v1_word_borrow_is_read_as_gptqmodel_writes_it():
  """GPTQModel writes v1 by subtracting 0x11111111 from whole words: a zero point of 0 borrows from its neighbour."""
  w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
  w[:32, 0] = np.abs(w[:32, 0])
  q = quantize(w, QSpec(bits=4, group_size=32, symmetric=False, partial_groups=True))
  v2 = to_gptq(q, checkpoint_format="gptq_v2")
  gptqmodel_v1 = v2._replace(qzeros=(v2.qzeros.view(np.uint32) - np.uint32(0x11111111)).view(np.int32))
  with pytest.warns(UserWarning, match="vLLM and TGI read these groups differently"):
    back = from_gptq(gptqmodel_v1, bits=4, group_size=32, sym=False, checkpoint_format="gptq")
  assert_same_qarray(back, q)


def test_gptq_act_order_round_trips_through_the_quantizer():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((K, N)).astype(np.float32)
  x = rng.standard_normal((512, K)).astype(np.float32) * np.linspace(0.1, 3, K, dtype=np.float32)
  for static_groups in (False, True):
    spec = QSpec(bits=4, group_size=64, symmetric=False)
    q, _ = gptq_quantize(w, x.T @ x, spec=spec, config=GptqConfig(act_order=True, static_groups=static_groups))
    back = from_gptq(to_gptq(q), bits=4, group_size=64, sym=False)
    expected = canonical_act_order(q)
    assert_same_qarray(back, dataclasses.replace(expected, spec=dataclasses.replace(spec, partial_groups=True)))
    assert (back.perm is None) == static_groups


def test_directory_round_trip_and_layout(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=48, symmetric=False, partial_groups=True))
  out = str(tmp_path / "gptq")
  save_gptq(out, checkpoint.config, params, checkpoint.tokenizer())
  assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  qc = config["quantization_config"]
  assert config["torch_dtype"] == "float16"
  assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", 4, 48, False, False)
  assert qc["checkpoint_format"] == qc["format"] == "gptq" and qc["lm_head"] is False
  with open(os.path.join(out, "quantize_config.json")) as f:
    assert json.load(f) == qc
  with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
    assert f.metadata() == {"format": "pt"}
    assert f.get_tensor("lm_head.weight").dtype == np.float16
    assert f.get_tensor("model.layers.1.mlp.down_proj.qzeros").shape == (3, 8)  # in=128: groups of 48, 48, 32
  config, back = load_gptq(out)
  assert config == checkpoint.config
  original = dict(leaves_with_paths(params))
  for path, leaf in leaves_with_paths(back):
    if is_qarray(leaf):
      assert_same_qarray(leaf, original[path])
    else:
      np.testing.assert_array_equal(leaf, np.asarray(original[path], np.float16).astype(np.float32))


def test_sharded_output_reads_back(model_dir, tmp_path):
  spec = QSpec(bits=8, group_size=32, partial_groups=True)
  checkpoint, params = quantized_params(model_dir, spec, LINEARS + "|lm_head/kernel")
  out = str(tmp_path / "sharded")
  save_gptq(out, checkpoint.config, params, None, checkpoint_format="gptq_v2", max_shard_bytes=1 << 20)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    files = set(json.load(f)["weight_map"].values())
  assert len(files) > 2 and "model.safetensors" not in os.listdir(out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["quantization_config"]["lm_head"] is True
  _, back = load_gptq(out)
  for path in ("model/layers_1/self_attn/o_proj/kernel", "lm_head/kernel"):
    a, b = (dict(leaves_with_paths(p))[path] for p in (back, params))
    assert_same_qarray(a, b)


def test_interrupted_write_leaves_nothing(model_dir, tmp_path, monkeypatch):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32))

  def boom(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(shards, "write_safetensors", boom)
  with pytest.raises(KeyboardInterrupt):
    save_gptq(str(tmp_path / "out"), checkpoint.config, params, None)
  assert os.listdir(tmp_path) == []


def test_what_a_gptq_config_cannot_describe_is_refused(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32))
  out = str(tmp_path / "x")
  asym = Rule(r"model/layers_0/mlp/down_proj/kernel", rtn(QSpec(bits=8, group_size=32, symmetric=False)))
  mixed = quantize_params(checkpoint.params(), [asym, Rule(LINEARS, rtn(QSpec(bits=4, group_size=32)))])
  with pytest.raises(ValueError, match="one sym for all layers"):
    save_gptq(out, checkpoint.config, mixed, None)
  dense = checkpoint.params()
  with pytest.raises(ValueError, match="needs quantized linears"):
    save_gptq(out, checkpoint.config, dense, None)
  five = quantized_params(model_dir, QSpec(bits=5, group_size=32))[1]
  with pytest.raises(ValueError, match=r"expected bits in \(2, 3, 4, 8\)"):
    save_gptq(out, checkpoint.config, five, None)
  with pytest.raises(ValueError, match="checkpoint_format in"):
    save_gptq(out, checkpoint.config, params, None, checkpoint_format="marlin")
  assert not os.path.exists(out)


def mixed_widths(model_dir):
  """``(checkpoint, params)``: layer 0's q/k/v at 8 bits, layer 1's down_proj at 3 in groups of 64, the rest at 4
  in groups of 32."""
  checkpoint = open_checkpoint(model_dir)
  width = lambda bits, group=32: rtn(QSpec(bits=bits, group_size=group, partial_groups=True))
  rules = [Rule(r"model/layers_0/self_attn/[qkv]_proj/kernel", width(8)),
           Rule(r"model/layers_1/mlp/down_proj/kernel", width(3, 64)), Rule(LINEARS, width(4))]  # fmt: skip
  return checkpoint, quantize_params(checkpoint.params(), rules)


def test_mixed_widths_are_dynamic_overrides_that_read_back(model_dir, tmp_path):
  """A width and group size per module is GPTQModel's ``dynamic`` config; its patterns also name the layers vLLM
  fuses q/k/v and gate/up into (vLLM matches a fused layer's own name), and the directory reads back exactly."""
  checkpoint, params = mixed_widths(model_dir)
  out = str(tmp_path / "mixed")
  save_gptq(out, checkpoint.config, params, None)
  qc = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
  assert (qc["bits"], qc["group_size"]) == (4, 32)

  def layout(module):  # the first pattern matching from the start of the name, as GPTQModel and vLLM resolve them
    found = [v for k, v in qc["dynamic"].items() if re.match(k.removeprefix("+:"), module)]
    return (found[0]["bits"], found[0]["group_size"]) if found else (qc["bits"], qc["group_size"])

  assert layout("model.layers.0.self_attn.qkv_proj") == layout("model.layers.0.self_attn.k_proj") == (8, 32)
  assert layout("model.layers.1.mlp.down_proj") == (3, 64) and layout("model.layers.1.mlp.gate_up_proj") == (4, 32)
  assert layout("model.layers.10.self_attn.q_proj") == (4, 32)  # layer 1's patterns do not reach layer 10
  _, back = load_gptq(out)
  for path, leaf in leaves_with_paths(params):
    if is_qarray(leaf):
      assert_same_qarray(dict(leaves_with_paths(back))[path], leaf)


@pytest.fixture()
def exported(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32))
  out = str(tmp_path / "gptq")
  save_gptq(out, checkpoint.config, params, checkpoint.tokenizer())
  return out


def edit_config(directory, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["quantization_config"].update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize(
  ("changes", "message"),
  [
    ({"bits": 8}, r"qweight: expected shape \(16, 64\) int32 for 8-bit group_size=32 GPTQ.*does not describe"),
    ({"group_size": 64}, r"qzeros: expected shape \(1, 8\).*does not describe"),
    ({"checkpoint_format": "marlin", "format": "marlin"}, "unknown GPTQ checkpoint_format 'marlin'"),
    ({"checkpoint_format": "gptq_v2", "format": "gptq_v2", "sym": True}, "sym=true but the zero points"),
    ({"bits": 5}, r"GPTQ bits must be one of \(2, 3, 4, 8\), got 5"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
  ],
)
def test_config_that_does_not_match_the_tensors(exported, changes, message):
  edit_config(exported, **changes)
  with pytest.raises(ValueError, match=message):
    load_model(exported)


def test_v1_zeros_labelled_sym_point_at_the_format(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32))
  out = str(tmp_path / "v2")
  save_gptq(out, checkpoint.config, params, None, checkpoint_format="gptq_v2")
  edit_config(out, checkpoint_format="gptq", format="gptq")
  with pytest.raises(ValueError, match="read as gptq_v2: the config's checkpoint_format is probably wrong"):
    load_gptq(out)


def test_truncated_or_extra_tensors(exported):
  weights = os.path.join(exported, "model.safetensors")
  with safe_open(weights, "numpy") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  save_file({**tensors, "model.layers.0.mlp.up_proj.bias": np.zeros(128, np.float16)}, weights)
  with pytest.raises(ValueError, match=r"tensors the config does not describe: \['model.layers.0.mlp.up_proj.bias'\]"):
    load_gptq(exported)
  size = os.path.getsize(weights)
  with open(weights, "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(ValueError, match=r"model\.safetensors: unreadable safetensors file.*truncated"):
    load_model(exported)


def test_export_settings_are_checked_before_quantizing(model_dir):
  config = open_checkpoint(model_dir).config
  with pytest.raises(ValueError, match=r"--export=gptq stores bits \(2, 3, 4, 8\), got --bits=5"):
    plan(Settings(method="rtn", bits=5, export="gptq"), config)
  with pytest.raises(ValueError, match="use a --method that rounds"):
    plan(Settings(method="none", export="gptq_v2"), config)
  with pytest.raises(ValueError, match=r"--export expected gguf:<TYPE> .* or one of gptq, .*, got 'exl2'"):
    plan(Settings(method="rtn", export="exl2"), config)


def test_a_quantized_directory_is_not_quantized_again(exported):
  with pytest.raises(ValueError, match="a gptq checkpoint is already quantized"):
    open_checkpoint(exported)


# ---- real loaders ----


def hf_logits(model, windows):
  import torch

  with torch.no_grad():
    return model(torch.tensor(np.asarray(windows), dtype=torch.long)).logits.float().numpy()


def default_windows(tokenizer, seqlen=64, n=2):
  return texts.eval_windows(texts.tokenize(tokenizer, texts.load_text("default", "evaluation")), seqlen, max_windows=n)


def perplexity(logits, windows):
  """Perplexity of next-token predictions from precomputed (b, t, vocab) logits."""
  return evaluate(lambda ids: jnp.asarray(logits), windows, batch_size=len(windows), show_progress=False).perplexity


def compare_with_transformers(out, windows, **load):
  """Max |Δlogit|, max |logit| and both perplexities: transformers on `out` against qjax on `load_model(out)`."""
  from transformers import AutoModelForCausalLM

  ours = load_model(out)
  mine = np.asarray(logits_fn(ours.config, ours.params)(jnp.asarray(windows)))
  theirs = hf_logits(AutoModelForCausalLM.from_pretrained(out, device_map="cpu", **load), windows)
  return (
    float(np.abs(theirs - mine).max()),
    float(np.abs(mine).max()),
    perplexity(theirs, windows),
    perplexity(mine, windows),
  )


# A family's GPTQ and AWQ exports (tests/formats/test_{qwen3,gemma3,phi3}.py): act-order GPTQ, asymmetric AWQ+GPTQ.
FAMILY_EXPORTS = pytest.mark.parametrize(
  "settings",
  [
    dict(method="gptq", desc_act=True, export="gptq", group_size=64),
    dict(method="awq+gptq", export="awq", group_size=64, sym=False),
  ],
  ids=["gptq_act_order", "awq"],
)


def family_export(model: str, out: str, settings: dict, *, seqlen: int = 64):
  """``(checkpoint, config, params, export path)``: `model` quantized as `settings` say on 4 windows of `seqlen`
  tokens, then exported to `out`."""
  pytest.importorskip("torch")
  pytest.importorskip("gptqmodel")
  s = Settings(model=model, nsamples=4, seqlen=seqlen, **settings)
  checkpoint, config, params = quantize_like_cli(s)
  path = export(parse_target(s.export), out, config, params, checkpoint.tokenizer(), name=os.path.basename(model))
  return checkpoint, config, params, path


def assert_transformers_agrees(out, windows, label: str) -> None:
  """transformers' logits on the export `out` are qjax's within 3e-3 of the largest, perplexity within 0.1%."""
  import torch

  diff, scale, ppl_theirs, ppl_ours = compare_with_transformers(out, windows, dtype=torch.float32)
  print(f"{label}: max |Δlogit| {diff:.5f} (max |logit| {scale:.2f}); perplexity transformers {ppl_theirs:.4f} "
        f"qjax {ppl_ours:.4f}")  # fmt: skip
  assert diff < 3e-3 * scale
  assert abs(ppl_theirs - ppl_ours) / ppl_ours < 1e-3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
def test_transformers_loads_the_default_model_export(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("optimum")
  pytest.importorskip("gptqmodel")
  out = str(tmp_path / "gptq")
  run(Settings(method="rtn", bits=4, group_size=64, export="gptq", eval_windows=0, out=out), show_progress=False)
  windows = default_windows(load_model(out).tokenizer)
  diff, scale, ppl_theirs, ppl_ours = compare_with_transformers(out, windows, dtype=torch.float32)
  print(f"default model GPTQ w4g64: max |Δlogit| {diff:.4f} (max |logit| {scale:.1f}); "
        f"perplexity transformers {ppl_theirs:.4f} qjax {ppl_ours:.4f}")  # fmt: skip
  assert diff < 3e-3 * scale
  assert abs(ppl_theirs - ppl_ours) / ppl_ours < 1e-3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_transformers_loads_act_order_3_bit_v2_and_partial_group_exports(model_dir, tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("optimum")
  pytest.importorskip("gptqmodel")
  from transformers import GPTQConfig

  checkpoint = open_checkpoint(model_dir)
  rng = np.random.default_rng(0)
  asym = QSpec(bits=4, group_size=32, symmetric=False, partial_groups=True)
  f32 = dict(dtype=torch.float32)

  def shuffled(path, w):  # act-order QArrays: groups of a random input order, a non-monotonic g_idx
    return act_order_qarray(np.asarray(w), asym, rng.permutation(w.shape[0])) if re.fullmatch(LINEARS, path) else w

  cases = {
    "act_order": (map_with_path(shuffled, checkpoint.params()), "gptq", f32),
    "3bit_v2": (quantized_params(model_dir, dataclasses.replace(asym, bits=3))[1], "gptq_v2", f32),
    # in=64 with groups of 128: gptqmodel's CPU auto-selection rejects in % group_size != 0; its torch kernel pads.
    "partial": (quantized_params(model_dir, QSpec(bits=4, group_size=128, partial_groups=True))[1], "gptq",
                dict(dtype=torch.float16, quantization_config=GPTQConfig(bits=4, backend="torch"))),
  }  # fmt: skip
  windows = np.arange(64)[None] % 1000
  for name, (params, checkpoint_format, load) in cases.items():
    out = str(tmp_path / name)
    save_gptq(out, checkpoint.config, params, checkpoint.tokenizer(), checkpoint_format=checkpoint_format)
    diff, scale, _, _ = compare_with_transformers(out, windows, **load)
    print(f"{name}: max |Δlogit| {diff:.2e} (max |logit| {scale:.2f})")
    assert diff < (2e-3 if load["dtype"] == torch.float16 else 5e-4) * scale, name


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_gptqmodel_checkpoint_imports_and_evaluates_the_same(model_dir, tmp_path, monkeypatch):
  """GPTQModel quantizes (act-order, asymmetric); qjax reads its directory and gets its logits and perplexity."""
  torch = pytest.importorskip("torch")
  gptqmodel = pytest.importorskip("gptqmodel")
  monkeypatch.chdir(tmp_path)  # gptqmodel writes logs/ into the working directory
  config = gptqmodel.QuantizeConfig(bits=4, group_size=32, sym=False, desc_act=True)
  model = gptqmodel.GPTQModel.load(model_dir, config, device="cpu")
  calibration = texts.load_text("default", "calibration")
  model.quantize([calibration[i * 2000 : (i + 1) * 2000] for i in range(16)], batch_size=1)
  out = str(tmp_path / "gptqmodel")
  model.save(out)

  ours = load_model(out)
  q = ours.params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.perm is not None and q.zero is not None and q.spec.group_size == 32
  # GPTQModel's default CPU kernel in float32 (TorchFusedLinear) disagrees with its own dequantization formula;
  # its torch kernel in float16 agrees with it, and with transformers.
  theirs = gptqmodel.GPTQModel.load(out, device="cpu", dtype=torch.float16, backend=gptqmodel.BACKEND.TORCH).model
  windows = default_windows(ours.tokenizer, 64, 4)
  mine = np.asarray(logits_fn(ours.config, ours.params)(jnp.asarray(windows)))
  their_logits = hf_logits(theirs, windows)
  diff = np.abs(their_logits - mine).max()
  ppl_theirs, ppl_ours = perplexity(their_logits, windows), perplexity(mine, windows)
  print(f"gptqmodel checkpoint: max |Δlogit| {diff:.2e}; perplexity gptqmodel {ppl_theirs:.3f} qjax {ppl_ours:.3f}")
  assert diff < 5e-3
  assert abs(ppl_theirs - ppl_ours) / ppl_ours < 1e-3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_gptqmodel_loads_mixed_widths(model_dir, tmp_path):
  """GPTQModel reads the ``dynamic`` widths and group sizes (3, 4 and 8 bits here) and computes qjax's logits."""
  torch = pytest.importorskip("torch")
  gptqmodel = pytest.importorskip("gptqmodel")
  checkpoint, params = mixed_widths(model_dir)
  out = str(tmp_path / "mixed")
  save_gptq(out, checkpoint.config, params, checkpoint.tokenizer())
  theirs = gptqmodel.GPTQModel.load(out, device="cpu", dtype=torch.float16, backend=gptqmodel.BACKEND.TORCH).model
  down = theirs.model.layers[1].mlp.down_proj
  assert theirs.model.layers[0].self_attn.q_proj.bits == 8 and (down.bits, down.group_size) == (3, 64)
  windows = default_windows(checkpoint.tokenizer(), 64, 2)
  ours = load_model(out)
  mine = np.asarray(logits_fn(ours.config, ours.params)(jnp.asarray(windows)))
  diff = np.abs(hf_logits(theirs, windows) - mine).max()
  print(f"mixed-width GPTQ in GPTQModel: max |Δlogit| {diff:.2e} of {np.abs(mine).max():.2f}")
  assert diff < 5e-3
