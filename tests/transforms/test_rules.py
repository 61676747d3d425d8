import jax
import numpy as np
import pytest

from qjax.core import QArray, QSpec, dequantize
from qjax.transforms import Rule, chain, masked, plan, quantize_params, rtn, stateless


def _params():
  rng = np.random.default_rng(0)
  dense = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {
    "embed": {"embedding": dense(16, 64)},
    "layers": {
      "0": {"attn": {"q_proj": {"kernel": dense(64, 64)}}, "mlp": {"up": {"kernel": dense(64, 128)}}},
      "1": {"attn": {"q_proj": {"kernel": dense(64, 64)}}, "mlp": {"up": {"kernel": dense(64, 128)}}},
    },
    "norm": {"scale": dense(64)},
  }


def test_first_match_wins_and_unmatched_stay_dense():
  params = _params()
  rules = [
    Rule("layers/1/mlp/.*", rtn(QSpec(bits=8, group_size=32))),
    Rule("layers/.*/kernel", rtn(QSpec(bits=4, group_size=32))),
  ]
  q = quantize_params(params, rules)
  assert q["layers"]["1"]["mlp"]["up"]["kernel"].spec.bits == 8
  assert q["layers"]["0"]["mlp"]["up"]["kernel"].spec.bits == 4
  assert q["layers"]["0"]["attn"]["q_proj"]["kernel"].spec.bits == 4
  assert q["embed"]["embedding"] is params["embed"]["embedding"]
  assert q["norm"]["scale"] is params["norm"]["scale"]


def test_none_rule_keeps_dense_ahead_of_catch_all():
  q = quantize_params(_params(), [(".*/q_proj/kernel", None), (".*/kernel", rtn(QSpec(bits=4, group_size=32)))])
  assert not isinstance(q["layers"]["0"]["attn"]["q_proj"]["kernel"], QArray)
  assert isinstance(q["layers"]["0"]["mlp"]["up"]["kernel"], QArray)


def test_plan_reports_assignment_and_unused_rules():
  rules = [(".*/kernel", rtn(QSpec(bits=4, group_size=32))), (".*/k_proj/kernel", None)]
  p = plan(_params(), rules)
  assert p.assignment()["layers/0/mlp/up/kernel"] == ".*/kernel"
  assert p.assignment()["norm/scale"] is None
  assert [r.pattern for r in p.unused_rules] == [".*/k_proj/kernel"]
  assert "matched no parameter" in str(p)
  with pytest.warns(UserWarning, match="matched no parameter"):
    quantize_params(_params(), rules)


def test_nan_and_inf_are_named():
  params = _params()
  params["layers"]["1"]["mlp"]["up"]["kernel"][3, 3] = np.nan
  params["layers"]["0"]["attn"]["q_proj"]["kernel"][0, 0] = np.inf
  with pytest.raises(ValueError) as e:
    quantize_params(params, [(".*/kernel", rtn(QSpec(bits=4, group_size=32)))])
  assert "layers/1/mlp/up/kernel: 1 NaN" in str(e.value)
  assert "layers/0/attn/q_proj/kernel: 0 NaN, 1 Inf" in str(e.value)


def test_non_matrix_and_double_quantization_are_refused():
  with pytest.raises(ValueError, match="norm/scale: shape \\(64,\\) is not 2-D"):
    quantize_params(_params(), [("norm/scale", rtn(QSpec(bits=4, group_size=32)))])
  q = quantize_params(_params(), [(".*/kernel", rtn(QSpec(bits=4, group_size=32)))])
  with pytest.raises(ValueError, match="already a QArray"):
    quantize_params(q, [(".*/kernel", rtn(QSpec(bits=4, group_size=32)))])


def test_chain_and_masked_compose():
  block = _params()["layers"]["0"]
  is_up = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: "up" in jax.tree_util.keystr(path), params)
  double_up = masked(stateless(lambda params, **_: jax.tree.map(lambda x: 2 * x, params)), is_up)
  t = chain(double_up, rtn(QSpec(bits=8, group_size=32, scale_dtype=np.float32)))
  state = t.init(block)
  q, _ = t.update(block, state)
  np.testing.assert_allclose(dequantize(q["mlp"]["up"]["kernel"]), 2 * block["mlp"]["up"]["kernel"], atol=0.05)
  np.testing.assert_allclose(dequantize(q["attn"]["q_proj"]["kernel"]), block["attn"]["q_proj"]["kernel"], atol=0.03)
  with pytest.raises(ValueError, match="call init first"):
    t.update(block, state[:1])
