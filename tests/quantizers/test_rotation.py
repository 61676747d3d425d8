import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import quantize_model
from qjax.models import LlamaBlocks, SafetensorsCheckpoint, logits_fn
from qjax.quantizers.rotation import hadamard, paley, random_rotation
from qjax.transforms import rotate
from tests.model_factory import random_windows, write_random_llama


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 48, 64, 576, 1536, 4096])
def test_hadamard_matrices(n):
  h = hadamard(n)
  assert h is not None and set(np.unique(h)) <= {-1, 1}
  f = h.astype(np.float64)  # BLAS, and exact: every entry of h hᵀ is an integer of magnitude at most n
  np.testing.assert_array_equal(f @ f.T, n * np.eye(n))


def test_paley_and_fallback():
  np.testing.assert_array_equal(paley(11) @ paley(11).T, 12 * np.eye(12, dtype=np.int64))
  with pytest.raises(ValueError, match="prime q"):
    paley(13)
  assert hadamard(6) is None  # no Hadamard matrix of order 6 exists
  r = random_rotation(6, seed=1)
  np.testing.assert_allclose(r @ r.T, np.eye(6), atol=1e-12)
  assert not np.allclose(random_rotation(12, seed=1), random_rotation(12, seed=2))


@pytest.mark.parametrize(("family", "tie"), [("Llama", False), ("Llama", True), ("Qwen3", True), ("Phi3", False)])
def test_rotation_folded_into_the_model_leaves_it_unchanged(tmp_path, family, tie):
  # Qwen3's per-head q/k norms act on the projections' outputs, which the rotation leaves unchanged; so does Phi-3's
  # RoPE over part of each head. Phi-3's fused projections are rotated as their parts.
  path = write_random_llama(str(tmp_path / "m"), layers=2, hidden=64, intermediate=128, tie=tie, family=family)
  checkpoint = SafetensorsCheckpoint(path)
  rotated = quantize_model(LlamaBlocks(checkpoint), [rotate(seed=0)])
  assert "lm_head" in rotated  # a rotation unties a tied output embedding
  w = rotated["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert not np.allclose(w, checkpoint.layer_params(0)["self_attn"]["q_proj"]["kernel"])
  ids = jnp.asarray(random_windows(2, 16))
  before = np.asarray(logits_fn(checkpoint.config, checkpoint.params())(ids))
  untied = dataclasses.replace(checkpoint.config, tie_word_embeddings=False)
  after = np.asarray(logits_fn(untied, rotated)(ids))
  np.testing.assert_allclose(after, before, atol=1e-5 * np.abs(before).max() + 1e-5)
