import jax
import jax.numpy as jnp
import numpy as np

from qjax.calib.runner import RunnerOptions, quantize_blocks
from qjax.core import QSpec, affine
from qjax.core.qarray import group_view, ungroup
from qjax.models import SafetensorsCheckpoint
from qjax.models.blocks import LlamaBlocks
from qjax.quantizers import lwc
from qjax.transforms import learned_clipping, rtn
from qjax.transforms.rules import rules_transform
from tests.model_factory import random_windows, write_random_llama


def test_fake_quantize_is_differentiable_and_starts_near_rtn():
  w = jnp.asarray(np.random.default_rng(0).standard_t(3, size=(64, 8)), jnp.float32)
  spec = QSpec(bits=3, group_size=32, symmetric=False, scale_dtype=np.float32)
  logits = lwc.init_logits(w, spec)
  fq = lwc.fake_quantize(w, logits, spec)
  # At init every range is the RTN range shrunk by sigmoid(INIT_LOGIT): the same grid as RTN on that range.
  g = group_view(w, spec)
  shrink = jax.nn.sigmoid(lwc.INIT_LOGIT)
  params = affine.params_from_range(shrink * g.min(axis=1), shrink * g.max(axis=1), bits=3, symmetric=False,
                                    scale_dtype=spec.scale_dtype)  # fmt: skip
  expected = ungroup(affine.dequantize_groups(affine.quantize_groups(g, params, 3), params, 3), 64)
  assert np.mean(np.abs(np.asarray(fq) - np.asarray(expected)) > 1e-4) < 0.01
  grads = jax.grad(lambda lg: jnp.sum((lwc.fake_quantize(w, lg, spec) - w) ** 2))(logits)
  assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))


def test_learned_clipping_lowers_the_block_error_of_rtn(tmp_path):
  path = write_random_llama(str(tmp_path / "m"), layers=1, hidden=64, intermediate=128)
  blocks = LlamaBlocks(SafetensorsCheckpoint(path))
  spec = QSpec(bits=3, group_size=32, symmetric=False)
  round_ = rules_transform([(r"model/layers_\d+/.*_proj/kernel", rtn(spec))])
  windows = random_windows(8, 32)
  options = RunnerOptions(batch_size=8, show_progress=False)
  _, h_float = quantize_blocks(blocks, [], windows, options=options)
  _, h_rtn = quantize_blocks(blocks, [round_], windows, options=options)
  stages = [learned_clipping(spec, steps=30, learning_rate=2e-2), round_]
  _, h_lwc = quantize_blocks(blocks, stages, windows, options=options)
  assert np.mean((h_lwc - h_float) ** 2) < np.mean((h_rtn - h_float) ** 2)
