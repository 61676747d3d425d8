import logging
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import ClipSearch, QSpec, dequantize, unpack
from qjax.quantizers import GptqConfig, GptqInfo, gptq_quantize, rtn_quantize
from qjax.quantizers.gptq import gptq_core
from qjax.transforms import gptq

# ---------------------------------------------------------------------------------------------
# Float64 NumPy reference: Frantar et al. (2022), Algorithm 1 one column at a time (lazy batching
# only reorders the same updates), with qjax.core.affine's grid conventions.


def _np_grid(x, spec, clip):
  """Scale (out,) and zero (out,)|None of a group x (group, out), as `affine.find_params`."""
  maxq = 2**spec.bits - 1

  def from_range(lo, hi):
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if spec.symmetric:
      hi = np.maximum(-lo, hi)
      lo = -hi
    dead = (lo == 0) & (hi == 0)
    lo, hi = np.where(dead, -1.0, lo), np.where(dead, 1.0, hi)
    scale = ((hi - lo) / maxq).astype(spec.scale_dtype).astype(np.float64)
    zero = None if spec.symmetric else np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero

  lo, hi = x.min(0), x.max(0)
  best = from_range(lo, hi)
  if clip is not None:
    err = lambda g: np.sum(np.abs(_np_value(x, *g, spec.bits) - x) ** clip.norm, axis=0)
    best_err = err(best)
    for i in range(1, clip.num_candidates):
      cand = from_range(lo * (1 - i / clip.grid), hi * (1 - i / clip.grid))
      cand_err = err(cand)
      better = cand_err < best_err
      best_err = np.where(better, cand_err, best_err)
      best = tuple(None if c is None else np.where(better, c, b) for c, b in zip(cand, best, strict=True))
  return best


def _zero(zero, bits):
  return 2 ** (bits - 1) if zero is None else zero


def _np_code(x, scale, zero, bits):
  return np.clip(np.round(x / scale) + _zero(zero, bits), 0, 2**bits - 1)


def _np_value(x, scale, zero, bits):
  return scale * (_np_code(x, scale, zero, bits) - _zero(zero, bits))


def _gar_perm(diag, group):
  """Group-aware reordering, written from its definition (arXiv:2505.14638; GPTQModel `gar_ref.py`)."""
  n = len(diag)
  full = n // group
  groups = [np.arange(g * group, (g + 1) * group) for g in range(full)]
  local = [idx[np.argsort(-diag[idx], kind="stable")] for idx in groups]
  ranked = np.argsort([-diag[idx].max() for idx in groups], kind="stable")
  tail = np.arange(full * group, n)
  return np.concatenate([local[g] for g in ranked] + [tail[np.argsort(-diag[tail], kind="stable")]])


def gptq_numpy(
  w, h, spec, *, damp=0.01, act_order=False, static_groups=False, clip=None, forced=None, group_aware=False
):
  """GPTQ in float64, one input channel at a time.

  Args:
    w, h: (in, out) kernel and (in, in) Hessian.
    forced: optional (codes (in, out) in sweep order, scale (groups, out), zero) of the
      implementation under test. The reference then checks every decision against its own
      and continues from the forced one, so one rounding tie cannot cascade into later columns.

  Returns:
    codes (in, out) in sweep order, perm, loss, and the tie distance (in grid steps from a
    rounding boundary) of every code decision that differs from `forced`, and the relative
    scale difference of every group grid that differs from it (inf for a different zero).
  """
  n = w.shape[0]
  W, H = w.T.astype(np.float64), h.astype(np.float64)
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  group = n if spec.group_size == -1 else spec.group_size
  dynamic = spec.group_size != -1 and not static_groups
  if group_aware and dynamic:
    perm = _gar_perm(np.diag(H), group)
  else:
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
  static = [_np_grid(W[:, j : j + group].T, spec, clip) for j in range(0, n, group)]
  W, H = W[:, perm], H[perm][:, perm]
  H += damp * np.mean(np.diag(H)) * np.eye(n)
  U = np.linalg.cholesky(np.linalg.inv(H)).T
  codes, ties, grid_diffs, loss = np.zeros((n, W.shape[0])), [], [], 0.0
  for c in range(n):
    if dynamic and c % group == 0:
      grid = _np_grid(W[:, c : c + group].T, spec, clip)
      if forced is not None:
        got = (forced[1][c // group], None if spec.symmetric else forced[2][c // group])
        diff = np.abs(got[0] / grid[0] - 1)
        if not spec.symmetric:
          diff[got[1] != grid[1]] = np.inf
        grid_diffs.extend(diff[diff > 0])
        grid = got
    elif not dynamic:
      grid = static[perm[c] // group]
    code = _np_code(W[:, c], *grid, spec.bits)
    if forced is not None:
      differ = code != forced[0][c]
      t = W[differ, c] / (grid[0] if np.ndim(grid[0]) == 0 else grid[0][differ])
      ties.extend(np.abs(np.abs(t - np.floor(t)) - 0.5))
      code = forced[0][c].astype(np.float64)
    codes[c] = code
    err = (W[:, c] - grid[0] * (code - _zero(grid[1], spec.bits))) / U[c, c]
    W[:, c:] -= np.outer(err, U[c, c:])
    loss += 0.5 * np.sum(err**2)
  return codes, perm, loss, np.asarray(ties), np.asarray(grid_diffs)


def _codes_in_sweep_order(q, perm):
  codes = np.asarray(unpack(q.codes, q.spec.bits))
  return codes if q.perm is not None else codes[perm]


def _problem(seed, n_in, n_out, *, n_samples=None, heavy=False):
  """Kernel (in, out) and correlated (optionally heavy-tailed per channel) activations (n, in)."""
  rng = np.random.default_rng(seed)
  mix = np.eye(n_in) + rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
  x = rng.standard_normal((n_samples or 2 * n_in, n_in)) @ mix
  if heavy:
    x *= np.exp(rng.standard_normal(n_in))
  w = 0.02 * rng.standard_t(df=5, size=(n_in, n_out))
  return w.astype(np.float32), x.astype(np.float32)


def _hessian(x):
  return (x.T @ x).astype(np.float32)


CASES = [
  # name, spec, config; in=320 with block_size 128 leaves a tail block of 64.
  ("int4_g64_sym", QSpec(bits=4, group_size=64), {}),
  ("int3_g32_asym_actorder", QSpec(bits=3, group_size=32, symmetric=False), {"act_order": True}),
  (
    "int4_g64_asym_actorder_static",
    QSpec(bits=4, group_size=64, symmetric=False),
    {"act_order": True, "static_groups": True},
  ),
  ("int2_perchannel_asym", QSpec(bits=2, group_size=-1, symmetric=False), {}),
  ("int8_perchannel_sym_actorder", QSpec(bits=8, group_size=-1), {"act_order": True}),
  ("int5_g32_sym_block48", QSpec(bits=5, group_size=32, scale_dtype=np.float32), {"block_size": 48}),
  ("int6_g64_asym_block48", QSpec(bits=6, group_size=64, symmetric=False), {"block_size": 48}),
  ("int4_g160_sym_clip_actorder", QSpec(bits=4, group_size=160), {"act_order": True, "clip": ClipSearch(grid=20)}),
  # 320 inputs in groups of 128: the last group is 64 wide (GPTQ checkpoints' convention).
  ("int4_g128_partial_asym", QSpec(bits=4, group_size=128, symmetric=False, partial_groups=True), {}),
  ("int4_g64_group_aware", QSpec(bits=4, group_size=64), {"group_aware": True}),
  ("int3_g128_partial_group_aware", QSpec(bits=3, group_size=128, partial_groups=True), {"group_aware": True}),
  ("int4_g128_partial_actorder", QSpec(bits=4, group_size=128, partial_groups=True), {"act_order": True}),
  (
    "int3_g128_partial_static",
    QSpec(bits=3, group_size=128, partial_groups=True),
    {"act_order": True, "static_groups": True, "block_size": 96},
  ),
]


@pytest.mark.parametrize(("spec", "config"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_float64_reference(spec, config):
  w, x = _problem(0, 320, 48)
  h = _hessian(x)
  q, info = gptq_quantize(w, h, spec=spec, config=GptqConfig(**config))
  numpy_config = {k: v for k, v in config.items() if k != "block_size"}
  free_codes, perm, *_ = gptq_numpy(w, h, spec, **numpy_config)
  got = _codes_in_sweep_order(q, perm)
  dynamic_act_order = config.get("act_order", False) and spec.group_size != -1 and not config.get("static_groups")
  assert (q.perm is not None) == dynamic_act_order
  if q.perm is not None:
    np.testing.assert_array_equal(q.perm, perm)
  # The float32 sweep and the float64 one round identically except where a value lies within
  # float32 noise of a rounding boundary (x / s = k + 1/2). Teacher-forcing the reference with
  # our decisions checks each decision on an identical history: every differing code must be
  # such a tie; scales may differ by the rounding of the scale dtype, and rarely more (a
  # float16 rounding boundary, an asymmetric zero or a clip candidate decided by a tie).
  scale, zero = np.asarray(q.scale, np.float64), None if q.zero is None else np.asarray(q.zero)
  if config.get("group_aware"):  # grids come back in group order; the reference meets them in sweep order
    sweep_groups = perm[:: spec.group_size][: len(scale)] // spec.group_size
    scale, zero = scale[sweep_groups], None if zero is None else zero[sweep_groups]
  forced = (got, scale, zero)
  _, _, forced_loss, ties, grid_diffs = gptq_numpy(w, h, spec, forced=forced, **numpy_config)
  assert ties.size <= 0.001 * got.size
  assert np.all(ties < 1e-3), ties
  assert np.sum(grid_diffs > max(np.finfo(spec.scale_dtype).eps, 1e-5)) <= 0.01 * q.scale.size
  # Free running, a tie decided the other way moves later columns a little and can flip a few
  # more near-ties; the codes still agree almost everywhere.
  assert np.mean(free_codes != got) < 0.005
  np.testing.assert_allclose(float(info.loss), forced_loss, rtol=1e-4)
  assert bool(info.ok) and float(info.damp) == pytest.approx(0.01)


def test_loss_is_output_error_without_damping():
  w, x = _problem(1, 256, 32)
  q, info = gptq_quantize(w, 2 * _hessian(x) / len(x), spec=QSpec(bits=4, group_size=64), config=GptqConfig(damp=0.0))
  err = x @ (np.asarray(dequantize(q)) - w)
  np.testing.assert_allclose(float(info.loss), np.sum(err**2) / len(x), rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Quality: the relations the paper establishes.


def _output_error(x, w, q):
  return np.linalg.norm(x @ (np.asarray(dequantize(q), np.float64) - w))


@pytest.mark.parametrize("bits", [3, 4])
def test_beats_rtn(bits):
  w, x = _problem(2, 512, 128)
  spec = QSpec(bits=bits, group_size=128)
  ratio = _output_error(x, w, gptq_quantize(w, _hessian(x), spec=spec)[0]) / _output_error(
    x, w, rtn_quantize(w, spec=spec)
  )
  assert ratio < 0.8, ratio


def test_act_order_helps_on_heavy_tailed_activations():
  spec = QSpec(bits=3, group_size=-1)
  gains = []
  for seed in range(3):
    w, x = _problem(10 + seed, 256, 64, heavy=True)
    plain, _ = gptq_quantize(w, _hessian(x), spec=spec)
    ordered, _ = gptq_quantize(w, _hessian(x), spec=spec, config=GptqConfig(act_order=True))
    gains.append(_output_error(x, w, ordered) / _output_error(x, w, plain))
  assert np.mean(gains) < 0.97, gains


# ---------------------------------------------------------------------------------------------
# Degenerate Hessians and bad input.


def test_dead_inputs_quantize_to_zero():
  w, x = _problem(3, 128, 16)
  x[:, [5, 77]] = 0.0
  spec = QSpec(bits=4, group_size=32, symmetric=False)
  q, info = gptq_quantize(w, _hessian(x), spec=spec, config=GptqConfig(act_order=True))
  deq = np.asarray(dequantize(q))
  assert int(info.dead) == 2 and np.isfinite(deq).all()
  np.testing.assert_array_equal(deq[[5, 77]], 0.0)


def test_damp_is_raised_until_cholesky_succeeds():
  w, x = _problem(4, 128, 16)
  h = _hessian(x)
  eig_min = np.linalg.eigvalsh(h.astype(np.float64))[0]
  # Shift H to be indefinite: it needs damp > 0.025 (relative to the new mean diagonal).
  shift = eig_min + 0.025 * (np.mean(np.diag(h)) - eig_min) / (1 + 0.025)
  q, info = gptq_quantize(w, h - shift * np.eye(128, dtype=np.float32), spec=QSpec(bits=4, group_size=32))
  assert float(info.damp) == pytest.approx(0.03) and np.isfinite(np.asarray(dequantize(q))).all()


def test_rank_deficient_hessian_without_damping_is_rescued():
  w, x = _problem(5, 128, 16, n_samples=32)  # rank 32 < 128
  q, info = gptq_quantize(w, _hessian(x), spec=QSpec(bits=4, group_size=32), config=GptqConfig(damp=0.0))
  assert bool(info.ok) and np.isfinite(np.asarray(dequantize(q))).all()
  assert _output_error(x, w, q) < _output_error(x, w, rtn_quantize(w, spec=QSpec(bits=4, group_size=32)))


@pytest.mark.parametrize("kind", ["negative_definite", "nan"])
def test_non_positive_definite_hessian_raises(kind):
  w, x = _problem(6, 128, 16)
  h = -_hessian(x) if kind == "negative_definite" else np.full((128, 128), np.nan, np.float32)
  with pytest.raises(
    ValueError, match=r"Hessian for the \(128, 16\) weight is not positive definite after raising damp to 1\.00"
  ):
    gptq_quantize(w, h, spec=QSpec(bits=4, group_size=32))
  _, info = gptq_core(w, h, spec=QSpec(bits=4, group_size=32))
  assert not bool(info.ok)


def test_bad_arguments_raise():
  w = np.zeros((576, 8), np.float32)
  h = np.eye(576, dtype=np.float32)
  with pytest.raises(ValueError, match=re.escape("group_size=128 for shape=(576, 8) (in=576)")):
    gptq_quantize(w, h, spec=QSpec(bits=4, group_size=128))
  with pytest.raises(ValueError, match=re.escape("h.shape=(8, 8)")):
    gptq_quantize(w, h[:8, :8], spec=QSpec(bits=4, group_size=64))
  with pytest.raises(TypeError, match="gptq_core"):
    jax.jit(lambda w, h: gptq_quantize(w, h, spec=QSpec(bits=4, group_size=64)))(w, h)


# ---------------------------------------------------------------------------------------------
# Compilation.


def _count_eqns(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          count += _count_eqns(sub)
  return count


def test_trace_size_does_not_grow_with_in_features():
  spec = QSpec(bits=4, group_size=64, symmetric=False)
  trace = jax.make_jaxpr(lambda w, h: gptq_core(w, h, spec=spec, config=GptqConfig(act_order=True)))
  sizes = [_count_eqns(trace(np.zeros((n, 32), np.float32), np.eye(n, dtype=np.float32)).jaxpr) for n in (256, 1024)]
  assert abs(sizes[0] - sizes[1]) <= 0.05 * sizes[0], sizes


def test_second_call_does_not_recompile(caplog):
  w, x = _problem(7, 128, 16)
  h = _hessian(x)
  spec = QSpec(bits=4, group_size=32)
  gptq_quantize(w, h, spec=spec)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    q, info = gptq_quantize(w + 1.0, h, spec=spec)
  assert isinstance(info, GptqInfo) and q.shape == w.shape
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# Sharding over output channels: 8 fake CPU devices need XLA_FLAGS before jax starts.

_SHARDED_SCRIPT = textwrap.dedent(
  """
  import numpy as np, jax
  from qjax.core import QSpec
  from qjax.quantizers import GptqConfig, gptq_quantize
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((512, 256)) @ (np.eye(256) + rng.standard_normal((256, 256)) / 16)).astype(np.float32)
  w = rng.standard_normal((256, 64)).astype(np.float32)
  h = x.T @ x
  spec = QSpec(bits=4, group_size=32, symmetric=False)
  one, one_info = gptq_quantize(w, h, spec=spec, config=GptqConfig(act_order=True))
  for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
    mesh = jax.make_mesh((8,), ("out",), axis_types=(axis_type,))
    sharded, info = gptq_quantize(w, h, spec=spec, config=GptqConfig(act_order=True), mesh=mesh)
    assert sharded.scale.sharding.is_fully_replicated, sharded.scale.sharding  # gathered: every process reads it
    assert jax.tree.structure(one) == jax.tree.structure(sharded)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(sharded), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(info.damp) == float(one_info.damp) and bool(info.ok)
    np.testing.assert_allclose(float(info.loss), float(one_info.loss), rtol=1e-5)
  try:
    gptq_quantize(w[:, :60], h, spec=spec, mesh=mesh)
  except ValueError as e:
    assert "divisible by the 8 devices" in str(e), e
  else:
    raise AssertionError("no error for out=60 over 8 devices")
  print("SHARDED_OK")
  """
)


def test_sharded_over_8_devices_equals_single_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
  )
  assert run.returncode == 0 and "SHARDED_OK" in run.stdout, run.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# Transform.


def test_transform_reads_the_hessian_statistic():
  w, x = _problem(8, 128, 16)
  spec = QSpec(bits=4, group_size=32)
  t = gptq(spec)
  assert t.stats == {"hessian"}
  params = {"dense": {"kernel": w}}
  q, _ = t.update(params, t.init(params), stats={"dense/kernel": {"hessian": _hessian(x)}})
  expected, _ = gptq_quantize(w, _hessian(x), spec=spec)
  np.testing.assert_array_equal(q["dense"]["kernel"].codes, expected.codes)
  with pytest.raises(ValueError, match="'hessian'"):
    t.update(params, t.init(params), stats={})


@pytest.mark.parametrize(
  "config,damp",
  [(GptqConfig(), 0.01), (GptqConfig(act_order=True), 0.01), (GptqConfig(group_aware=True, damp=0.0), 0.0)],
  ids=["plain", "act_order", "group_aware_retried"],
)
def test_separate_programs_and_a_donated_hessian_give_the_one_program_codes(config, damp):
  """`gptq_quantize` factors in programs of its own (and may take the Hessian over); under jit the factorisation is
  part of one program: the same codes and dampening, bit for bit, also when the dampening had to be raised."""
  w, x = _problem(11, 128, 24, n_samples=48 if damp == 0.0 else None)  # rank 48 < 128: no factor without damping
  spec = QSpec(bits=4, group_size=32)
  one, one_info = jax.jit(lambda w, h: gptq_core(w, h, spec=spec, config=config))(w, _hessian(x))
  h = jnp.asarray(_hessian(x))
  q, info = gptq_quantize(w, h, spec=spec, config=config, donate_hessian=True)
  assert h.is_deleted()  # its buffer held GPTQ's working copy
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(one.codes))
  np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(one.scale))
  assert float(info.damp) == float(one_info.damp)
  assert (float(info.damp) > config.damp) == (damp == 0.0)  # raised exactly where no factor exists undampened


def test_no_factorisation_program_holds_more_than_two_and_a_quarter_hessians():
  """GPTQ's (in, in) buffers (0.8 GB each for Llama-3's 14336-wide down_proj input) by XLA's own accounting of each
  program it runs: arguments, outputs and temporaries, a donated argument counted once."""
  from qjax.quantizers import gptq as gptq_lib

  n, spec, config = 512, QSpec(bits=4, group_size=128), GptqConfig()
  programs = gptq_lib._factor_programs(jax.devices()[0], True)
  square = jax.ShapeDtypeStruct((n, n), jnp.float32)
  scalar, k = jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
  compiled = [
    programs.prepare.lower(square, spec=spec, config=config).compile(),
    programs.factors.lower(square, scalar, k, config.damp).compile(),
    programs.lower.lower(square, scalar, k, config.damp).compile(),
    programs.inverse.lower(square).compile(),
  ]
  for c in compiled:
    m = c.memory_analysis()
    held = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    assert held / (4 * n * n) <= 2.3, c.as_text().splitlines()[0]
