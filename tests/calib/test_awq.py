"""AWQ: exact folding, quality against RTN on real weights, and its errors."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.calib.runner import RunnerOptions, quantize_blocks
from qjax.core import QSpec
from qjax.formats import open_checkpoint
from qjax.models import SafetensorsCheckpoint, logits_fn
from qjax.models.blocks import LlamaBlocks
from qjax.quantizers import awq as awq_core
from qjax.transforms import awq, quantize_params, rtn
from qjax.transforms.rules import rules_transform
from tests.model_factory import random_windows, write_random_llama

SPEC = QSpec(bits=4, group_size=32, symmetric=False)
KERNELS = r"model/layers_\d+/.*_proj/kernel"


@pytest.mark.parametrize("kv_heads", [4, 2])  # without GQA AWQ also scales o_proj against v_proj
def test_folded_scales_leave_the_float_model_unchanged(tmp_path, kv_heads):
  path = write_random_llama(str(tmp_path / "m"), layers=2, hidden=64, intermediate=128, heads=4, kv_heads=kv_heads)
  blocks = LlamaBlocks(SafetensorsCheckpoint(path))
  options = RunnerOptions(batch_size=4, show_progress=False)
  qblocks, _ = quantize_blocks(blocks, [awq(SPEC, clip=False, n_grid=5)], random_windows(8, 32), options=options)
  folded = blocks.assemble(blocks.embed_params(), qblocks, blocks.head_params())
  original = blocks.checkpoint.params()
  assert not np.allclose(folded["model"]["layers_0"]["input_layernorm"]["scale"],
                         original["model"]["layers_0"]["input_layernorm"]["scale"])  # fmt: skip
  if kv_heads == 4:
    assert not np.allclose(folded["model"]["layers_1"]["self_attn"]["v_proj"]["kernel"],
                           original["model"]["layers_1"]["self_attn"]["v_proj"]["kernel"])  # fmt: skip
  ids = jnp.asarray(random_windows(2, 24, seed=5))
  before = np.asarray(logits_fn(blocks.config, original)(ids))
  after = np.asarray(logits_fn(blocks.config, folded)(ids))
  np.testing.assert_allclose(after, before, atol=1e-4 * np.abs(before).max())


def test_search_tokens_bounds_the_batches_the_scale_search_runs(tmp_path, monkeypatch):
  awq_transform = importlib.import_module("qjax.transforms.awq")  # the module, not the function qjax.transforms.awq

  path = write_random_llama(str(tmp_path / "m"), layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2)
  blocks = LlamaBlocks(SafetensorsCheckpoint(path))
  options = RunnerOptions(batch_size=2, show_progress=False)  # 3 batches of 2 x 32 tokens
  searched = []
  search = awq_transform._search_group
  monkeypatch.setattr(awq_transform, "_search_group", lambda j, b, g, batches, *a: searched.append(len(batches))
                      or search(j, b, g, batches, *a))  # fmt: skip
  for tokens, expected in [(65, 2), (None, 3)]:  # at least 65 tokens: two batches of 64
    searched.clear()
    quantize_blocks(
      blocks, [awq(SPEC, clip=False, n_grid=2, search_tokens=tokens)], random_windows(6, 32), options=options
    )
    assert set(searched) == {expected}, (tokens, searched)


def test_scale_search_picks_the_lowest_loss():
  x_mean = jnp.asarray([1.0, 10.0, 0.1])
  s, losses = awq_core.search_scale(x_mean, None, lambda s: jnp.sum((s - jnp.asarray([0.5, 2.0, 1.0])) ** 2), n_grid=20)
  assert losses.shape == (20,)
  best = int(jnp.argmin(losses))
  np.testing.assert_allclose(s, awq_core.candidate_scales(x_mean, None, jnp.float32(best / 20)))


def test_a_stack_of_scale_searches_is_each_member_searched_alone():
  """Each expert's own α: the stacked search equals one search per expert."""
  rng = np.random.default_rng(0)
  x_mean, w_mean = jnp.asarray(rng.uniform(0.1, 5, (3, 6))), jnp.asarray(rng.uniform(0.1, 1, (3, 6)))
  targets = jnp.asarray(rng.uniform(0.5, 2, (3, 6)))
  s, losses = awq_core.search_scale(x_mean, w_mean, lambda s: jnp.sum((s - targets) ** 2, axis=-1), n_grid=10)
  assert s.shape == (3, 6) and losses.shape == (10, 3)
  for e in range(3):
    alone, _ = awq_core.search_scale(x_mean[e], w_mean[e], lambda s, e=e: jnp.sum((s - targets[e]) ** 2), n_grid=10)
    np.testing.assert_allclose(s[e], alone, rtol=1e-6)
  assert len({float(jnp.argmin(losses[:, e])) for e in range(3)}) > 1  # the members chose differently


@pytest.mark.slow
def test_awq_beats_rtn_on_real_blocks():
  checkpoint = open_checkpoint("default")
  blocks = LlamaBlocks(checkpoint)
  blocks.num_layers = 2  # the first two blocks of SmolLM2
  tokens = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "calibration"))
  windows = texts.calibration_windows(tokens, 8, 128)
  spec = QSpec(bits=3, group_size=64, symmetric=False)
  round_ = rules_transform([(KERNELS, rtn(spec))])
  options = RunnerOptions(batch_size=8, show_progress=False)
  _, h_float = quantize_blocks(blocks, [], windows, options=options)
  _, h_rtn = quantize_blocks(blocks, [round_], windows, options=options)
  _, h_awq = quantize_blocks(blocks, [awq(spec), round_], windows, options=options)
  err_rtn, err_awq = np.mean((h_rtn - h_float) ** 2), np.mean((h_awq - h_float) ** 2)
  assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


class _UnknownArchitecture:
  """A block model that names no AWQ scale groups."""

  def __init__(self, inner):
    self.inner = inner
    self.num_layers = inner.num_layers
    self.sequential_groups = inner.sequential_groups

  def __getattr__(self, name):
    if name == "scale_groups":
      raise AttributeError(name)
    return getattr(self.inner, name)


def test_unknown_scale_groups_are_an_error_naming_the_block(tmp_path):
  path = write_random_llama(str(tmp_path / "m"), layers=1, hidden=64, intermediate=128)
  blocks = _UnknownArchitecture(LlamaBlocks(SafetensorsCheckpoint(path)))
  with pytest.raises(ValueError, match=r"scale groups of block 'model/layers_0'"):
    quantize_blocks(blocks, [awq(SPEC)], random_windows(4, 16), options=RunnerOptions(show_progress=False))


def test_awq_outside_the_runner_is_an_error():
  with pytest.raises(ValueError, match="runs inside the calibration runner"):
    quantize_params({"k": {"kernel": np.ones((32, 4), np.float32)}}, [(".*", awq(SPEC))])
