"""Floating-point grids: every E2M1 and E4M3 code decoded as the format specifications define it, rounding to the
nearest value (ties to even) against a brute-force float64 oracle, MX's shared exponent, NVFP4's two-level scales,
GPTQ and RTN into them."""

import ml_dtypes
import numpy as np
import pytest

from qjax.core import QSpec, dequantize, quantize
from qjax.core.fp_grid import (
  Fp8Grid,
  MxFp4Grid,
  NvFp4Grid,
  e2m1_codes,
  e2m1_values,
  e4m3_codes,
  e4m3_values,
  nvfp4_global_scale,
)
from qjax.core.qarray import unpacked_codes
from qjax.formats.awq import to_awq
from qjax.formats.gptq import to_gptq
from qjax.transforms import rtn
from qjax.transforms.base import fused_specs


def spec_value(code: int, exp_bits: int, man_bits: int, bias: int, nan_code: int | None) -> float:
  """A minifloat code's value from the specification: sign, biased exponent, mantissa; subnormal at exponent 0."""
  sign = -1.0 if code >> (exp_bits + man_bits) else 1.0
  e, m = (code >> man_bits) & ((1 << exp_bits) - 1), code & ((1 << man_bits) - 1)
  if nan_code is not None and code & ((1 << (exp_bits + man_bits)) - 1) == nan_code:
    return float("nan")
  if e == 0:
    return sign * m / (1 << man_bits) * 2.0 ** (1 - bias)
  return sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)


def test_every_code_decodes_as_the_specifications_say():
  e2m1 = [spec_value(c, 2, 1, 1, None) for c in range(16)]  # OCP MX v1.0 §5.3.3: no NaN, no Inf, max 6
  np.testing.assert_array_equal(np.asarray(e2m1_values(np.arange(16))), np.float32(e2m1))
  assert max(e2m1) == 6.0
  e4m3 = [spec_value(c, 4, 3, 7, 0x7F) for c in range(256)]  # OCP FP8 v1.0: S.1111.111 is NaN, max 448
  np.testing.assert_array_equal(np.asarray(e4m3_values(np.arange(256))), np.float32(e4m3))
  assert np.nanmax(e4m3) == 448.0
  # and ml_dtypes, a third implementation, agrees
  np.testing.assert_array_equal(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32),
                                np.float32(e4m3))  # fmt: skip


@pytest.mark.parametrize("fmt", ["e2m1", "e4m3"])
def test_rounding_is_to_nearest_even_and_saturates(fmt):
  encode, decode, codes, maximum = {
    "e2m1": (e2m1_codes, e2m1_values, np.arange(16), 6.0),
    "e4m3": (e4m3_codes, e4m3_values, np.array([c for c in range(256) if c & 0x7F != 0x7F]), 448.0),
  }[fmt]
  table = np.asarray(decode(codes), np.float64)
  rng = np.random.default_rng(0)
  mids = (np.unique(table)[1:] + np.unique(table)[:-1]) / 2  # exact ties
  x = np.concatenate([rng.standard_normal(2000) * maximum / 3, mids, -mids, [maximum * 1.5, -maximum * 7]])
  got = np.asarray(decode(encode(np.float32(x))), np.float64)
  for xi, gi in zip(x, got, strict=True):
    target = np.clip(xi, -maximum, maximum)
    dist = np.abs(table - target)
    best = codes[dist == dist.min()]
    if len(set(table[dist == dist.min()])) > 1:
      best = best[best % 2 == 0]  # a tie: the even mantissa
    assert gi in table[np.isin(codes, best)], (xi, gi)


def test_mx_shared_exponent_is_ocps():
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((3, 32, 5)) * np.exp(rng.uniform(-8, 4, (3, 1, 5)))).astype(np.float32)
  w[1, :, 2] = 0.0
  exponent = np.asarray(MxFp4Grid().fit(w).scale, np.int32) - 127
  amax = np.abs(w).max(axis=1)
  expected = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
  np.testing.assert_array_equal(exponent, expected)
  _, values = MxFp4Grid().round(w, MxFp4Grid().fit(w), np.arange(32))
  # the largest magnitude lands in [4, 8) times the scale: rounded up at most from just above 5 to 6
  assert np.all(np.abs(values) <= np.abs(w).max(axis=1, keepdims=True) * 1.2 * (1 + 1e-6))
  assert not np.asarray(values)[1, :, 2].any()


def test_hf_integer_formats_refuse_floating_point_codes():
  w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
  q = quantize(w, QSpec(bits=4, group_size=32, grid=MxFp4Grid()))
  assert np.abs(np.asarray(dequantize(q)) - w).max() < np.abs(w).max() / 4
  for export in (to_gptq, to_awq):  # compressed-tensors has formats of its own for them
    with pytest.raises(ValueError, match=r"integer codes on the affine grid.*got MxFp4Grid"):
      export(q)
  q8 = quantize(w, QSpec(bits=8, group_size=-1, grid=Fp8Grid()))
  assert np.abs(np.asarray(dequantize(q8)) - w).max() <= np.abs(w).max() / 16  # 3 mantissa bits


def test_nvfp4_scales_and_values_are_the_formats():
  rng = np.random.default_rng(2)
  for magnitude in (1e-3, 0.02, 1.0, 300.0):
    spread = np.exp(rng.uniform(-6, 0, (8, 1, 24))).repeat(16, axis=1).reshape(128, 24)  # groups far apart in size
    w = (rng.standard_normal((128, 24)) * magnitude * spread).astype(np.float32)
    w[16:32, 3] = 0.0  # an all-zero group
    q = quantize(w, QSpec(bits=4, group_size=16, grid=NvFp4Grid()))
    gs = q.spec.grid.global_scale
    assert gs == 2.0 ** np.floor(np.log2(448 * 6 / np.abs(w).max()))  # a power of two
    scales = np.asarray(e4m3_values(q.scale), np.float64)
    assert 224 < scales.max() <= 448  # the largest group's scale in E4M3's top binade
    assert scales[1, 3] == 0.125  # compressed-tensors' scale for a group that rounds to 0
    # the format's decode in float64: W = e2m1(code) * e4m3(scale) / global_scale
    codes = np.asarray(unpacked_codes(q)).astype(np.int64)
    e2m1 = np.asarray(e2m1_values(np.arange(16)), np.float64)
    expected = e2m1[codes] * scales.repeat(16, axis=0) / gs
    np.testing.assert_array_equal(np.asarray(dequantize(q), np.float64), expected)
    # each value is the nearest point of its group's grid (max|w| of a group maps to at most 6 scale units)
    err = np.abs(np.asarray(dequantize(q)) - w).reshape(8, 16, 24).max(axis=1)
    assert np.all(err <= scales / gs * 1.0 + 1e-30)  # E2M1's widest step, 2, halved
  assert float(nvfp4_global_scale(0.0)) == 1.0
  with pytest.raises(ValueError, match=r"NvFp4Grid has no global scale yet; fix it per matrix"):
    NvFp4Grid().fit(np.ones((1, 16, 2), np.float32))


def test_fused_linears_share_one_nvfp4_global_scale():
  rng = np.random.default_rng(3)
  widths = {"self_attn/q_proj": (64, 64), "self_attn/k_proj": (64, 32), "self_attn/v_proj": (64, 32),
            "mlp/gate_proj": (64, 128), "mlp/up_proj": (64, 128), "mlp/down_proj": (128, 64)}  # fmt: skip
  scale = {"self_attn/k_proj": 40.0, "mlp/gate_proj": 30.0}  # one outlier linear in each fused set
  block = {}
  for name, shape in widths.items():
    part, module = name.split("/")
    w = (rng.standard_normal(shape) * scale.get(name, 1.0)).astype(np.float32)
    block.setdefault(part, {})[module] = {"kernel": w}
  params = {"model": {"layers_0": block}}
  specs = fused_specs(QSpec(bits=4, group_size=16, grid=NvFp4Grid()), {
    f"model/layers_0/{n}/kernel": block[n.split("/")[0]][n.split("/")[1]]["kernel"] for n in widths})  # fmt: skip
  gs = {n.removeprefix("model/layers_0/").removesuffix("/kernel"): s.grid.global_scale for n, s in specs.items()}
  k_max = np.abs(block["self_attn"]["k_proj"]["kernel"]).max()
  assert gs["self_attn/q_proj"] == gs["self_attn/k_proj"] == gs["self_attn/v_proj"] == nvfp4_global_scale(k_max)
  assert gs["mlp/gate_proj"] == gs["mlp/up_proj"] != gs["mlp/down_proj"]  # down reads another input
  t = rtn(QSpec(bits=4, group_size=16, grid=NvFp4Grid()))
  q, _ = t.update(params, t.init(params))
  assert q["model"]["layers_0"]["self_attn"]["v_proj"]["kernel"].spec.grid.global_scale == gs["self_attn/v_proj"]
