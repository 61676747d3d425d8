import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.core import ClipSearch, QSpec, grid_values, round_to_grid


def _spec(bits, group_size, symmetric):
  return QSpec(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=np.float32)


@given(
  bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
  group_size=st.sampled_from([-1, 8, 16, 32]),
  symmetric=st.booleans(),
  groups=st.integers(1, 4),
  cols=st.integers(1, 6),
  seed=st.integers(0, 2**16),
)
def test_error_within_half_a_step(bits, group_size, symmetric, groups, cols, seed):
  rows = groups * (32 if group_size == -1 else group_size)
  w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
  spec = _spec(bits, group_size, symmetric)
  codes, params = round_to_grid(w, spec)
  deq = np.asarray(grid_values(codes, params, spec))
  step = np.repeat(np.asarray(params.scale), spec.group_length(rows), axis=0)
  # The grid spans [lo, hi]; every value within half a step of it rounds to within half a step,
  # and the range search guarantees that every value of the group is.
  zero = 2 ** (bits - 1) if params.zero is None else np.repeat(params.zero, spec.group_length(rows), 0)
  lo = -step * zero
  hi = lo + step * (2**bits - 1)
  tol = 1e-5 * step + 1e-7
  assert ((w >= lo - step / 2 - tol) & (w <= hi + step / 2 + tol)).all()
  np.testing.assert_array_less(np.abs(deq - w), 0.5 * step + tol)


def test_group_boundaries():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((128, 4)).astype(np.float32)
  spec = _spec(4, 32, False)
  _, before = round_to_grid(w, spec)
  w2 = w.copy()
  w2[64:96, 2] *= 10.0  # group 2 of column 2 only
  _, after = round_to_grid(w2, spec)
  changed = np.asarray(before.scale) != np.asarray(after.scale)
  expected = np.zeros((4, 4), bool)
  expected[2, 2] = True
  np.testing.assert_array_equal(changed, expected)


def test_values_on_the_grid_are_exact():
  rng = np.random.default_rng(1)
  spec = _spec(4, 16, False)
  scale = rng.uniform(0.01, 0.1, size=(2, 3)).astype(np.float32)
  codes = rng.integers(0, 16, size=(32, 3))
  codes[0], codes[16] = 0, 0  # each group spans its full range, so the same grid is found
  codes[1], codes[17] = 15, 15
  zero = np.array([[3, 8, 12], [0, 15, 7]])
  w = np.repeat(scale, 16, 0) * (codes - np.repeat(zero, 16, 0))
  q, params = round_to_grid(w.astype(np.float32), spec)
  np.testing.assert_allclose(grid_values(q, params, spec), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [3, 4])
def test_mse_clipping_beats_plain_rtn_on_heavy_tails(bits):
  w = np.random.default_rng(bits).standard_t(df=3, size=(1024, 64)).astype(np.float32)
  spec = _spec(bits, 128, True)
  plain = grid_values(*round_to_grid(w, spec), spec)
  clipped = grid_values(*round_to_grid(w, spec, clip=ClipSearch()), spec)
  mse_plain, mse_clip = np.mean((plain - w) ** 2), np.mean((clipped - w) ** 2)
  assert mse_clip < 0.9 * mse_plain, (mse_clip, mse_plain)


def test_quantize_under_jit_and_vmap():
  w = np.random.default_rng(0).standard_normal((5, 64, 8)).astype(np.float32)
  spec = _spec(4, 32, False)
  fn = jax.jit(jax.vmap(lambda x: grid_values(*round_to_grid(x, spec, clip=ClipSearch(grid=10)), spec)))
  out = fn(w)
  np.testing.assert_allclose(out[2], grid_values(*round_to_grid(w[2], spec, clip=ClipSearch(grid=10)), spec))


def test_zero_group_is_exact():
  w = np.zeros((32, 2), np.float32)
  spec = _spec(4, 32, False)
  codes, params = round_to_grid(w, spec)
  np.testing.assert_array_equal(grid_values(codes, params, spec), w)


def test_bad_group_size():
  with pytest.raises(ValueError, match="group_size to divide the input dimension"):
    round_to_grid(np.zeros((100, 4), np.float32), _spec(4, 32, True))
