"""Test configuration: CPU only, strict numerics, deterministic hypothesis."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis
import jax
import pytest

from tests.model_factory import write_random_llama

jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
  "qjax", derandomize=True, database=None, deadline=None, max_examples=25, print_blob=True
)
hypothesis.settings.load_profile("qjax")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A small random Llama directory (2 layers, hidden 64), written once per test module."""
  return write_random_llama(str(tmp_path_factory.mktemp("llama")))
