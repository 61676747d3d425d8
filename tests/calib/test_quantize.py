"""The whole-model loop: chains run as their stages, rotation as a stage, the statistics registry, tied heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from qjax.calib import RunnerOptions, Statistic, quantize_blocks, quantize_model, register_statistic
from qjax.calib.stats import STATISTICS
from qjax.core import QSpec
from qjax.formats import open_checkpoint
from qjax.models import LlamaBlocks, SafetensorsCheckpoint
from qjax.models.checkpoint import hf_layer_tensors
from qjax.transforms import awq, chain, gptq, masked, per_leaf, quantize_params, recipes, rotate, rtn, rules_transform
from qjax.transforms.equivalence import rotate_stream
from qjax.transforms.recipes import LINEAR_KERNELS
from tests.model_factory import random_windows, write_random_llama

SPEC = QSpec(bits=4, group_size=32, symmetric=False)
OPTIONS = RunnerOptions(batch_size=4, show_progress=False)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
  return write_random_llama(str(tmp_path_factory.mktemp("tied")), layers=2, hidden=64, intermediate=128, tie=True)


def assert_same_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_chain_as_one_stage_equals_its_stages_in_a_list(model_dir):
  """Each member's statistics are measured after the members before it changed the block."""
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  windows = random_windows(8, 32)
  gptq_rules = rules_transform([(LINEAR_KERNELS, gptq(SPEC))])
  listed = quantize_model(blocks, [awq(SPEC, clip=False, n_grid=4), gptq_rules], windows, options=OPTIONS)
  chained = quantize_model(blocks, [chain(awq(SPEC, clip=False, n_grid=4), gptq_rules)], windows, options=OPTIONS)
  assert_same_trees(listed, chained)


def test_a_chain_inside_a_mask_is_refused(model_dir):
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  inner = chain(rtn(SPEC), gptq(SPEC))
  with pytest.raises(ValueError, match="a chain inside a masked or partition transform cannot run as one"):
    quantize_blocks(blocks, [masked(inner, lambda p: jax.tree.map(lambda _: True, p))], random_windows(4, 32))


def _rotated_checkpoint(source: str, out: str, seed: int) -> str:
  """The float model with the rotation folded in by hand, saved as a Hugging Face directory: the old path."""
  checkpoint = SafetensorsCheckpoint(source)
  blocks = LlamaBlocks(checkpoint)
  parts = [blocks.embed_params(), blocks.head_params()]
  parts += [{"model": {f"layers_{i}": checkpoint.layer_params(i)}} for i in range(blocks.num_layers)]
  from qjax.transforms.equivalence import _rotation

  r = _rotation(checkpoint.config.hidden_size, seed)
  embed, head, *layers = (rotate_stream(p, blocks.residual_stream(p), r) for p in parts)
  tensors = {
    "model.embed_tokens.weight": embed["model"]["embed_tokens"]["embedding"],
    "model.norm.weight": head["model"]["norm"]["scale"],
    "lm_head.weight": head["lm_head"]["kernel"].T,
  }
  for i, layer in enumerate(layers):
    for name, (path, transpose) in hf_layer_tensors(checkpoint.config, i).items():
      value = layer["model"][f"layers_{i}"]
      for key in path:
        value = value[key]
      tensors[name] = value.T if transpose else value
  import json
  import os
  import shutil

  shutil.copytree(source, out)
  os.remove(os.path.join(out, "model.safetensors"))
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  save_file(tensors, os.path.join(out, "model.safetensors"))
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({**config, "tie_word_embeddings": False}, f)
  return out


def test_rotation_as_a_stage_equals_gptq_on_the_rotated_checkpoint(tied_dir, tmp_path):
  windows = random_windows(8, 32)
  stage = chain(rotate(seed=3), rules_transform([(LINEAR_KERNELS, gptq(SPEC))]))
  ours = quantize_model(LlamaBlocks(SafetensorsCheckpoint(tied_dir)), [stage], windows, options=OPTIONS)
  rotated = SafetensorsCheckpoint(_rotated_checkpoint(tied_dir, str(tmp_path / "rotated"), seed=3))
  reference = quantize_model(LlamaBlocks(rotated), recipes.gptq(SPEC), windows, options=OPTIONS)
  assert "lm_head" in ours  # the tied head was untied by the rotation
  assert_same_trees(ours, reference)


def test_a_tied_head_stays_tied_unless_a_stage_changes_it(tied_dir):
  checkpoint = SafetensorsCheckpoint(tied_dir)
  params = quantize_model(LlamaBlocks(checkpoint), recipes.rtn(SPEC))
  assert "lm_head" not in params
  expected = quantize_params(checkpoint.params(), [(LINEAR_KERNELS, rtn(SPEC))])
  assert_same_trees(params, expected)


def test_statistics_registry_and_a_new_statistic(model_dir):
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  register_statistic("sum_x", Statistic(jnp.zeros, lambda s, x: s + x.sum(0), lambda s, n: s))
  try:
    seen = {}

    def record(w, stats):
      seen.setdefault(w.shape, stats)
      return w

    stage = rules_transform([(LINEAR_KERNELS, per_leaf(record, stats=frozenset({"sum_x", "abs_max", "abs_mean"})))])
    windows = random_windows(4, 16)
    quantize_blocks(blocks, [stage], windows, options=RunnerOptions(batch_size=2, show_progress=False))
    h = np.concatenate([np.asarray(blocks.embed(blocks.embed_params(), w[None])) for w in windows])
    gamma = blocks.layer_params(0)["input_layernorm"]["scale"]
    x = (h / np.sqrt(np.mean(h**2, -1, keepdims=True) + blocks.config.rms_norm_eps) * gamma).reshape(-1, 64)
    first = seen[(64, 64)]  # q_proj of block 0
    np.testing.assert_allclose(first["abs_max"], np.abs(x).max(0), rtol=1e-5)
    np.testing.assert_allclose(first["sum_x"], x.sum(0), rtol=1e-4, atol=1e-4)
    assert first["tokens"] == len(x)
  finally:
    del STATISTICS["sum_x"]
  with pytest.raises(ValueError, match=r"asks for statistics \['nope'\]"):
    quantize_blocks(blocks, [per_leaf(lambda w, s: w, stats=frozenset({"nope"}))], random_windows(4, 16))
  with pytest.raises(ValueError, match="expected a new statistic name"):
    register_statistic("hessian", STATISTICS["hessian"])


def test_a_recipe_that_reads_statistics_needs_windows(model_dir):
  with pytest.raises(ValueError, match="pass calibration windows"):
    quantize_model(LlamaBlocks(open_checkpoint(model_dir)), recipes.gptq(SPEC))
