import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import QArray, QSpec, dequantize, from_codes, grid_values, quantize, round_to_grid


@pytest.mark.parametrize(
  "bits,group_size,symmetric",
  [(2, 16, False), (3, 32, True), (4, 128, True), (4, -1, False), (5, 32, False), (6, 64, True), (8, 32, False)],
)
def test_qarray_matches_affine_math(bits, group_size, symmetric):
  w = np.random.default_rng(bits).standard_normal((256, 48)).astype(np.float32)
  spec = QSpec(bits=bits, group_size=group_size, symmetric=symmetric)
  q = quantize(w, spec)
  codes, params = round_to_grid(w, spec)
  np.testing.assert_array_equal(dequantize(q), grid_values(codes, params, spec))
  assert q.codes.shape == (256 * bits // 32, 48)
  assert q.scale.dtype == jnp.float16
  assert (q.zero is None) == symmetric


def test_embedding_axis_and_dtype():
  w = np.random.default_rng(0).standard_normal((10, 64)).astype(jnp.bfloat16)
  q = quantize(w, QSpec(bits=8, group_size=32), axis=1)
  out = dequantize(q)
  assert out.shape == (10, 64) and out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(w, np.float32), atol=0.05)


def test_permutation_restores_original_order():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((64, 8)).astype(np.float32)
  perm = rng.permutation(64)
  spec = QSpec(bits=8, group_size=32, scale_dtype=np.float32)
  codes, params = round_to_grid(w[perm], spec)
  q = from_codes(codes, params, spec, perm=perm)
  np.testing.assert_allclose(dequantize(q), w, atol=0.02)
  np.testing.assert_array_equal(dequantize(q)[perm], grid_values(codes, params, spec))


def test_qarray_is_a_pytree():
  q = quantize(np.ones((64, 8), np.float32), QSpec(bits=4, group_size=32))
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 2  # codes and scale; symmetric: no zero; no perm
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert isinstance(rebuilt, QArray) and rebuilt.spec == q.spec
  np.testing.assert_array_equal(jax.jit(dequantize)(q), dequantize(q))
  assert q.bits_per_weight == pytest.approx(4 + 16 / 32)


def test_qspec_validation():
  with pytest.raises(ValueError, match="bits in"):
    QSpec(bits=7)
  with pytest.raises(ValueError, match="group_size"):
    QSpec(group_size=0)
  with pytest.raises(ValueError, match=r"QSpec\.ggml"):
    QSpec(bits=8, layout="Q4_K")
  assert QSpec.ggml("Q4_K").bits_per_weight(4096) == 4.5
  assert hash(QSpec(bits=4)) == hash(QSpec(bits=4, scale_dtype=jnp.float16))
