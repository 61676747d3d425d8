"""compressed-tensors checkpoints: exact round trips, the compressed-tensors package as the oracle (its packing,
its decompressor, directories it writes), transformers loading qjax's files, bad input."""

import dataclasses
import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qjax.cli.quantize import Settings, plan
from qjax.core import AffineGrid, Fp8Grid, MxFp4Grid, NvFp4Grid, PerTensorGrid, QSpec, dequantize, quantize
from qjax.core.errors import InputError
from qjax.core.tree import leaves_with_paths, map_with_path
from qjax.formats import Target, convert_model, load_model, open_checkpoint
from qjax.formats.compressed_tensors import (
  WeightArgs,
  from_compressed,
  load_compressed_tensors,
  pack_rows,
  save_compressed_tensors,
  to_compressed,
  unpack_rows,
  weight_args,
)
from qjax.formats.convert import summary
from qjax.formats.gptq import save_gptq, to_gptq, unpack_codes
from qjax.models.config import LlamaConfig
from qjax.transforms import Rule, quantize_params, rtn
from tests.formats.test_gptq import act_order_qarray, assert_same_qarray, compare_with_transformers, default_windows
from tests.model_factory import LINEARS, quantized_params


def read_json(path):
  with open(path) as f:
    return json.load(f)


def write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f)


K, N = 192, 40  # N not a multiple of 32: zero points fill a partial word


def sample(bits, group_size, symmetric, scale_dtype=np.float16, seed=0):
  w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)
  return quantize(w, QSpec(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 64, -1], ids=["g32", "g64", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_round_trip_is_exact(bits, group_size, symmetric):
  q = sample(bits, group_size, symmetric)
  args = weight_args(q.spec)
  t = to_compressed(q)
  assert t["weight_packed"].shape == (N, -(-K * bits // 32)) and t["weight_packed"].dtype == np.int32
  assert t["weight_scale"].shape == (N, q.scale.shape[0]) and t["weight_scale"].dtype == np.float16
  assert ("weight_zero_point" in t) == (not symmetric)
  assert_same_qarray(from_compressed(t, args, (K, N)), q)


@pytest.mark.parametrize(
  "inner", [AffineGrid(bits=8, symmetric=True, scale_dtype=np.float16), Fp8Grid()], ids=["int8", "fp8"]
)
def test_one_scale_per_tensor_round_trips_and_decompresses_as_the_package_does(inner):
  torch = pytest.importorskip("torch")
  pytest.importorskip("compressed_tensors")
  from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
  from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

  w = np.random.default_rng(4).standard_normal((K, N)).astype(np.float32)
  spec = QSpec(bits=8, group_size=-1, scale_dtype=inner.scale_dtype, grid=PerTensorGrid(grid=inner))
  q = quantize(w, spec)
  assert np.unique(np.asarray(q.scale)).size == 1 and q.spec.grid.scale == float(np.asarray(q.scale)[0, 0])
  args = weight_args(q.spec)
  assert (args.strategy, args.group_size, args.symmetric) == ("tensor", None, True)
  t = to_compressed(q)
  assert t["weight_scale"].shape == (1,)
  assert_same_qarray(from_compressed(t, args, (K, N)), q)
  scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**{k: v for k, v in args.as_json().items()
                                                                              if v is not None}))  # fmt: skip
  compressor = FloatQuantizationCompressor if isinstance(inner, Fp8Grid) else PackedQuantizationCompressor
  fp8 = lambda v: torch.from_numpy(v.view(np.uint8)).view(torch.float8_e4m3fn)  # torch has no ml_dtypes bridge
  state = {k: fp8(v) if v.dtype == ml_dtypes.float8_e4m3fn else torch.from_numpy(np.array(v)) for k, v in t.items()}
  theirs = compressor.decompress(state, scheme)["weight"]
  np.testing.assert_array_equal(theirs.float().numpy(), np.asarray(dequantize(q)).T.astype(inner.scale_dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_the_packages_own(bits):
  torch = pytest.importorskip("torch")
  helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
  rng = np.random.default_rng(bits)
  for rows, n in ((3, 64), (5, 40), (2, 7)):  # whole runs of 32 codes, a partial run, fewer than one word
    codes = rng.integers(0, 1 << bits, size=(rows, n))
    signed = torch.tensor(codes - (1 << (bits - 1)), dtype=torch.int8)
    theirs = helpers.pack_to_int32(signed, bits).numpy()
    np.testing.assert_array_equal(pack_rows(codes, bits), theirs)
    np.testing.assert_array_equal(unpack_rows(theirs, bits, n), codes)
    zero_theirs = helpers.pack_to_int32(signed.T.contiguous(), bits, packed_dim=0).numpy()  # zero points: along out
    np.testing.assert_array_equal(pack_rows(codes, bits).T, zero_theirs)


@pytest.mark.parametrize(
  "bits, group_size, symmetric, scale_dtype",
  [(4, 32, True, np.float32), (4, 64, False, np.float32), (8, -1, True, np.float32), (3, 32, False, np.float16)],
)
def test_the_packages_decompressor_gives_qjaxs_values(bits, group_size, symmetric, scale_dtype):
  torch = pytest.importorskip("torch")
  pytest.importorskip("compressed_tensors")
  from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

  q = sample(bits, group_size, symmetric, scale_dtype)
  args = weight_args(q.spec).as_json()
  scheme = QuantizationScheme(
    targets=["Linear"], weights=QuantizationArgs(**{k: v for k, v in args.items() if v is not None})
  )
  ours = {k: torch.from_numpy(np.array(v)) for k, v in to_compressed(q).items()}
  theirs = PackedQuantizationCompressor.decompress(ours, scheme)["weight"].numpy()
  expected = np.asarray(dequantize(q)).T.astype(scale_dtype)  # it multiplies in the scale dtype
  np.testing.assert_array_equal(theirs, expected)
  # and its compressor, given qjax's scales and zero points, packs qjax's dequantized weights into the same words
  state = {"weight": torch.from_numpy(np.asarray(dequantize(q)).T.copy()), "weight_scale": ours["weight_scale"]}
  if not symmetric:
    signed = np.asarray(q.zero).T - (1 << (bits - 1))
    state["weight_zero_point"] = torch.tensor(signed, dtype=torch.int8)
  packed = PackedQuantizationCompressor.compress(state, scheme)
  np.testing.assert_array_equal(packed["weight_packed"].numpy(), ours["weight_packed"].numpy())


def package_written_directory(model_dir, out, weights: dict):
  """`model_dir` quantized and saved by the compressed-tensors package itself (min-max scales, RTN); returns each
  quantized module's stored tensors as torch tensors."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("compressed_tensors")
  from compressed_tensors.compressors import ModelCompressor
  from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
  from compressed_tensors.quantization.utils import calculate_qparams

  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  scheme = QuantizationScheme(targets=["Linear"], weights=weights)
  config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format="pack-quantized")
  apply_quantization_config(model, config)
  with torch.no_grad():
    for _, module in model.named_modules():
      if hasattr(module, "weight_scale"):
        w, args = module.weight, module.quantization_scheme.weights
        rows = {"group": w.reshape(w.shape[0], -1, args.group_size or 1), "channel": w[:, None, :]}
        view = rows.get(args.strategy, w.reshape(1, 1, -1))
        scale, zero = calculate_qparams(view.amin(-1), view.amax(-1), args)
        module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
          module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
  quantized = [name for name, module in model.named_modules() if hasattr(module, "weight_scale")]
  compressor = ModelCompressor.from_pretrained_model(model)
  compressor.compress_model(model)
  model.save_pretrained(out)
  compressor.update_config(out)
  state = load_file(os.path.join(out, "model.safetensors"))
  tensors = lambda name: {k.removeprefix(name): torch.from_numpy(np.array(v)) for k, v in state.items()
                          if k.startswith(name)}  # fmt: skip
  return {name: tensors(f"{name}.") for name in quantized}


@pytest.mark.parametrize(
  "weights",
  [
    dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True),
    dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    dict(num_bits=8, type="int", strategy="channel", symmetric=True),
    dict(num_bits=4, type="int", strategy="tensor", symmetric=False),
    dict(num_bits=8, type="int", strategy="tensor", symmetric=True),
  ],
  ids=["w4g32", "w4g32_asym", "w8_channel", "w4_tensor_asym", "w8_tensor"],
)
def test_directories_the_package_writes_read_as_it_decompresses_them(model_dir, tmp_path, weights):
  pytest.importorskip("compressed_tensors")
  from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

  out = str(tmp_path / "ct")
  stored = package_written_directory(model_dir, out, QuantizationArgs(**weights))
  scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
  _, params = load_compressed_tensors(out)
  leaves = dict(leaves_with_paths(params))
  for name, state in stored.items():
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"].numpy()
    path = name.replace("layers.", "layers_").replace(".", "/") + "/kernel"
    np.testing.assert_array_equal(np.asarray(dequantize(leaves[path])).T, theirs, err_msg=name)
    if weights["strategy"] == "tensor" and weights["symmetric"]:  # one scale: written back as the package wrote it
      assert isinstance(leaves[path].spec.rounding_grid, PerTensorGrid)
      ours = to_compressed(leaves[path])
      assert set(ours) == set(state) and ours["weight_scale"].shape == (1,)
      for field, value in ours.items():
        np.testing.assert_array_equal(value, state[field].numpy(), err_msg=f"{name}.{field}")


def test_directory_round_trip_and_config(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32, symmetric=False))
  out = str(tmp_path / "ct")
  save_compressed_tensors(out, checkpoint.config, params, checkpoint.tokenizer(), actorder="weight")
  qc = read_json(os.path.join(out, "config.json"))["quantization_config"]
  assert (qc["quant_method"], qc["format"], qc["quantization_status"], qc["ignore"]) == (
    "compressed-tensors", "pack-quantized", "compressed", ["lm_head"])  # fmt: skip
  weights = qc["config_groups"]["group_0"]["weights"]
  assert weights == {"num_bits": 4, "type": "int", "symmetric": False, "group_size": 32, "strategy": "group",
                     "dynamic": False, "actorder": "weight"}  # fmt: skip
  model = load_model(out)
  for (path, a), (_, b) in zip(leaves_with_paths(params), leaves_with_paths(model.params), strict=True):
    if hasattr(a, "spec"):
      assert_same_qarray(b, a)
    else:
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(np.float16).astype(np.float32), err_msg=path)


def test_mixed_settings_are_one_scheme_each(model_dir, tmp_path):
  checkpoint = open_checkpoint(model_dir)
  rules = [Rule(r".*/down_proj/kernel", rtn(QSpec(bits=8, group_size=-1))),
           Rule(r"model/layers_\d+/.*_proj/kernel", rtn(QSpec(bits=4, group_size=32)))]  # fmt: skip
  params = quantize_params(checkpoint.params(), rules)
  out = str(tmp_path / "mixed")
  save_compressed_tensors(out, checkpoint.config, params, None)
  groups = read_json(os.path.join(out, "config.json"))["quantization_config"]["config_groups"]
  targets = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
  assert targets[8] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
  _, back = load_compressed_tensors(out)
  assert back["model"]["layers_1"]["mlp"]["down_proj"]["kernel"].spec.bits == 8
  assert back["model"]["layers_1"]["mlp"]["up_proj"]["kernel"].spec.bits == 4


def test_legacy_group_act_order_is_read_and_never_written(model_dir, tmp_path):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((K, N)).astype(np.float32)
  q = act_order_qarray(w, QSpec(bits=4, group_size=32), rng.permutation(K))
  with pytest.raises(ValueError, match=r"actorder 'group'.*--static_groups"):
    to_compressed(q, name="x")
  # an older checkpoint's layout: GPTQ's, codes in input order and the group of each input in weight_g_idx
  t = to_compressed(dataclasses.replace(q, perm=None))  # scales as stored: one row per group
  gptq = to_gptq(q)
  codes = np.asarray(unpack_codes(gptq.qweight.view(np.uint32), bits=4, axis=0))
  t["weight_packed"], t["weight_g_idx"] = pack_rows(codes.T, 4), gptq.g_idx
  back = from_compressed(t, WeightArgs(4, True, "group", 32, "group"), (K, N))
  np.testing.assert_array_equal(np.asarray(dequantize(back)), np.asarray(dequantize(q)))


def test_bad_schemes_and_tensors_are_named(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32))
  out = str(tmp_path / "ct")
  save_compressed_tensors(out, checkpoint.config, params, None)
  config_path = os.path.join(out, "config.json")
  original = read_json(config_path)

  def with_weights(**changes):
    config = json.loads(json.dumps(original))
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(changes)
    write_json(config_path, config)

  cases = [
    (dict(num_bits=7), r"config_groups.group_0: int num_bits must be one of \(2, 3, 4, 5, 6, 8\), got 7"),
    (dict(strategy="block"), r"weight strategy must be one of \(.*'tensor_group'\), got 'block'"),
    (dict(type="float", num_bits=6), r"float num_bits must be one of \(4, 8\), got 6"),
    (dict(type="float", num_bits=8), r"format 'pack-quantized' does not hold float weights \('float-quantized' does\)"),
    (dict(type="float", group_size=16), r"read as MXFP4 .* or NVFP4 .*, got strategy 'group' group_size 16"),
    (dict(type="fp4"), r"weights of type 'fp4' are not read"),
    (dict(group_size=64), r"model.layers.0.self_attn.q_proj.weight_scale: expected shape \(64, 1\)"),
  ]
  for changes, message in cases:
    with_weights(**changes)
    with pytest.raises(InputError, match=message):
      load_compressed_tensors(out)
  with_weights()
  tensors = load_file(os.path.join(out, "model.safetensors"))
  tensors["model.layers.1.mlp.up_proj.weight_shape"] = np.array([128, 65], np.int64)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(InputError, match=r"up_proj.weight_shape: expected \[128, 64\]"):
    load_compressed_tensors(out)


def test_export_settings_are_checked_before_quantizing():
  config = LlamaConfig(vocab_size=100, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64)  # fmt: skip
  for export in ("gptq", "awq", "compressed-tensors"):
    with pytest.raises(ValueError, match=rf"--export={export} with --group_size=128: 128 does not divide in=576 "
                       r"\(q_proj, .*, up_proj\); use --group_size in \[16, 32, 64, -1\]"):  # fmt: skip
      plan(Settings(method="rtn", export=export, group_size=128), config)
  plan(Settings(method="rtn", export="gptq", group_size=128, partial_groups=True), config)
  with pytest.raises(ValueError, match="--partial_groups"):
    plan(Settings(method="rtn", export="gptq", group_size=128), config)
  with pytest.raises(ValueError, match="actorder 'group'"):
    plan(Settings(method="gptq", export="compressed-tensors", group_size=64, desc_act=True), config)
  p = plan(Settings(method="gptq", export="compressed-tensors", group_size=64, desc_act=True, static_groups=True),
           config)  # fmt: skip
  assert p.actorder == "weight"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
@pytest.mark.parametrize(
  "settings",
  [
    # GPTQ in activation order with groups in input order (actorder "weight"): one GPTQ run covers both
    dict(method="gptq", group_size=64, desc_act=True, static_groups=True, nsamples=4, seqlen=128),
    dict(method="rtn", group_size=64, sym=False),
    dict(method="rtn", group_size=-1),
    dict(method="rtn", bits=8, group_size=64),
  ],
  ids=["gptq_w4g64_act_order", "asym", "channel", "w8a16"],
)
def test_transformers_loads_the_default_model_export(tmp_path, settings):
  torch = pytest.importorskip("torch")
  pytest.importorskip("compressed_tensors")
  from transformers import CompressedTensorsConfig

  from qjax.cli.quantize import run

  out = str(tmp_path / "ct")
  run(Settings(export="compressed-tensors", eval_windows=0, out=out, **settings), show_progress=False)
  windows = default_windows(load_model(out).tokenizer)
  # compressed-tensors 0.20.1 cannot load its own asymmetric files compressed (it sizes the zero points unpacked);
  # dequantizing at load time reads them.
  load = {} if settings.get("sym", True) else dict(quantization_config=CompressedTensorsConfig(dequantize=True))
  diff, scale, ppl_theirs, ppl_ours = compare_with_transformers(out, windows, dtype=torch.float32, **load)
  print(f"default model compressed-tensors {settings}: max |Δlogit| {diff:.4f} (max |logit| {scale:.1f}); "
        f"perplexity transformers {ppl_theirs:.4f} qjax {ppl_ours:.4f}")  # fmt: skip
  assert diff < 3e-3 * scale
  assert abs(ppl_theirs - ppl_ours) / ppl_ours < 1e-2


def test_convert_between_gptq_awq_and_compressed_tensors(model_dir, tmp_path):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32, symmetric=False))
  save_gptq(str(tmp_path / "gptq"), checkpoint.config, params, checkpoint.tokenizer())
  report = convert_model(str(tmp_path / "gptq"), Target("compressed-tensors"), str(tmp_path / "ct"))
  assert len(report) == 14 and all(r.exact for r in report)
  convert_model(str(tmp_path / "ct"), Target("awq"), str(tmp_path / "awq"))
  convert_model(str(tmp_path / "awq"), Target("gptq"), str(tmp_path / "gptq-again"))
  for path, leaf in leaves_with_paths(load_model(str(tmp_path / "gptq-again")).params):
    if hasattr(leaf, "spec"):  # the GPTQ reader allows a shorter last group, as GPTQ does
      assert_same_qarray(dataclasses.replace(leaf, spec=dataclasses.replace(leaf.spec, partial_groups=False)),
                         dict(leaves_with_paths(params))[path])  # fmt: skip
  # act-order groups have no compressed-tensors form: rounded again onto input-order groups, the error reported
  rng = np.random.default_rng(0)
  shuffled = map_with_path(
    lambda path, w: act_order_qarray(np.asarray(w), QSpec(bits=4, group_size=32), rng.permutation(w.shape[0]))
    if re.fullmatch(LINEARS, path) else w, checkpoint.params())  # fmt: skip
  save_gptq(str(tmp_path / "act-order"), checkpoint.config, shuffled, checkpoint.tokenizer())
  report = convert_model(str(tmp_path / "act-order"), Target("compressed-tensors"), str(tmp_path / "ct-act-order"))
  assert not any(r.exact for r in report) and all(0 < r.rel_rmse < 0.15 for r in report)
  assert "requantized" in summary(report)


@pytest.mark.parametrize(
  "spec, fmt, compressor",
  [
    (QSpec(bits=8, group_size=-1, scale_dtype=np.float32, grid=Fp8Grid()), "float-quantized",
     "naive_quantized.base.FloatQuantizationCompressor"),
    (QSpec(bits=4, group_size=32, grid=MxFp4Grid()), "mxfp4-pack-quantized", "mxfp4.base.MXFP4PackedCompressor"),
    (QSpec(bits=4, group_size=16, grid=NvFp4Grid()), "nvfp4-pack-quantized", "nvfp4.base.NVFP4PackedCompressor"),
  ],
  ids=["fp8", "mxfp4", "nvfp4"],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # transformers: our loading flags win
def test_floating_point_weights_are_written_as_the_package_reads_them(model_dir, tmp_path, spec, fmt, compressor):
  torch = pytest.importorskip("torch")
  pytest.importorskip("compressed_tensors")
  import importlib

  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

  module, _, name = compressor.rpartition(".")
  compressor = getattr(importlib.import_module(f"compressed_tensors.compressors.{module}"), name)
  checkpoint, params = quantized_params(model_dir, spec)
  out = str(tmp_path / fmt)
  save_compressed_tensors(out, checkpoint.config, params, checkpoint.tokenizer())
  qc = read_json(os.path.join(out, "config.json"))["quantization_config"]
  assert qc["format"] == fmt and qc["config_groups"]["group_0"]["weights"]["type"] == "float"
  with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
    state = {k.removeprefix("model.layers.0.mlp.up_proj."): f.get_tensor(k) for k in f.keys()
             if k.startswith("model.layers.0.mlp.up_proj.")}  # fmt: skip
  args = {k: v for k, v in weight_args(spec).as_json().items() if v is not None}
  scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
  theirs = compressor.decompress(state, scheme)["weight"].float().numpy()
  q = params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(theirs, np.asarray(dequantize(q)).T)
  if "nvfp4" in fmt:  # its compressor, given qjax's scales, packs qjax's dequantized weights into the same bytes
    again = dict(state, weight=torch.from_numpy(theirs.copy()), weight_scale=state["weight_scale"].float())
    np.testing.assert_array_equal(compressor.compress(again, scheme)["weight_packed"].numpy(),
                                  state["weight_packed"].numpy())  # fmt: skip
    gate = params["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]  # vLLM runs gate and up as one matrix
    assert gate.spec.grid.global_scale == q.spec.grid.global_scale == float(state["weight_global_scale"][0])
  model = load_model(out)
  for (_, a), (_, b) in zip(leaves_with_paths(params), leaves_with_paths(model.params), strict=True):
    if hasattr(a, "spec"):
      assert_same_qarray(b, a)
  windows = np.arange(64)[None] % 1000
  from transformers import CompressedTensorsConfig

  # compressed-tensors decompresses MXFP4 and NVFP4 to bfloat16 on the first forward, which a float32 model then
  # refuses; dequantizing at load time works
  load = dict(quantization_config=CompressedTensorsConfig(dequantize=True)) if "fp4" in fmt else {}
  diff, scale, _, _ = compare_with_transformers(out, windows, dtype=torch.float32, **load)
  print(f"{fmt}: max |Δlogit| {diff:.2e} (max |logit| {scale:.2f})")
  assert diff < 1e-4 * scale


def test_nvfp4_linears_vllm_fuses_must_share_their_global_scale(model_dir, tmp_path):
  checkpoint = open_checkpoint(model_dir)
  nvfp4 = QSpec(bits=4, group_size=16, grid=NvFp4Grid())
  rules = [Rule(r".*/k_proj/kernel", rtn(dataclasses.replace(nvfp4, grid=NvFp4Grid(global_scale=2.0**20)))),
           Rule(LINEARS, rtn(nvfp4))]  # fmt: skip
  params = quantize_params(checkpoint.params(), rules)
  with pytest.raises(ValueError, match=r"vLLM runs as one matrix have different global scales: .*k_proj"):
    save_compressed_tensors(str(tmp_path / "ct"), checkpoint.config, params, None)
  assert not os.path.exists(tmp_path / "ct")


def test_floating_point_grids_from_the_command_line(model_dir, tmp_path):
  from qjax.cli.quantize import run

  base = dict(model=model_dir, nsamples=2, seqlen=32, eval_windows=0)
  grids = {"fp8": "Fp8Grid", "mxfp4": "MxFp4Grid", "nvfp4": "NvFp4Grid", "affine": "PerTensorGrid"}
  for grid, flags, export in [("fp8", dict(bits=8, group_size=-1), None),
                              ("mxfp4", dict(group_size=32), "compressed-tensors"),
                              ("affine", dict(bits=8, group_size=-1, per_tensor=True), "compressed-tensors"),
                              ("nvfp4", dict(group_size=16), None)]:  # fmt: skip
    out = str(tmp_path / grid)
    run(Settings(method="gptq", grid=grid, export=export, out=out, **base, **flags), show_progress=False)
    block = load_model(out).params["model"]["layers_1"]
    q = block["mlp"]["down_proj"]["kernel"]
    assert type(q.spec.rounding_grid).__name__ == grids[grid]
  weights = read_json(os.path.join(tmp_path, "affine", "config.json"))["quantization_config"]["config_groups"]
  assert weights["group_0"]["weights"]["strategy"] == "tensor"
  # GPTQ ran q/k/v as one sequential group: one global scale, as vLLM needs; o_proj quantized alone has its own
  attn = {m: block["self_attn"][m]["kernel"].spec.grid.global_scale for m in ("q_proj", "k_proj", "v_proj")}
  assert len(set(attn.values())) == 1, attn
  config = open_checkpoint(model_dir).config
  with pytest.raises(ValueError, match="--grid=fp8 needs --bits=8 and a symmetric grid"):
    plan(Settings(grid="fp8", group_size=-1), config)
  with pytest.raises(ValueError, match="--grid=mxfp4 needs --bits=4 --group_size=32"):
    plan(Settings(grid="mxfp4", group_size=64), config)
  with pytest.raises(ValueError, match="--grid=mxfp4 with --export=gptq: that format stores integer codes"):
    plan(Settings(grid="mxfp4", group_size=32, export="gptq"), config)
  with pytest.raises(ValueError, match="--grid=nvfp4 needs --bits=4 --group_size=16"):
    plan(Settings(grid="nvfp4", group_size=32), config)
  with pytest.raises(ValueError, match="--per_tensor needs --grid=affine or fp8, --group_size=-1"):
    plan(Settings(per_tensor=True, group_size=32), config)
  with pytest.raises(ValueError, match="--per_tensor with --export=gptq: that format has no one-scale-per-matrix"):
    plan(Settings(per_tensor=True, group_size=-1, export="gptq"), config)
