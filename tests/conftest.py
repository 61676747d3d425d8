"""Test configuration: CPU only, strict numerics, deterministic hypothesis."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
  "qjax", derandomize=True, database=None, deadline=None, max_examples=25, print_blob=True
)
hypothesis.settings.load_profile("qjax")
