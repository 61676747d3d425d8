import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qjax.calib.runner import Interrupted, RunnerOptions, quantize_blocks
from qjax.core import QSpec, dequantize
from qjax.models import SafetensorsCheckpoint
from qjax.models.blocks import LlamaBlocks
from qjax.transforms import gptq, rtn
from qjax.transforms.base import per_leaf
from qjax.transforms.rules import rules_transform
from tests.model_factory import random_windows, write_random_llama

KERNELS = r"model/layers_\d+/.*_proj/kernel"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return write_random_llama(str(tmp_path_factory.mktemp("llama")), layers=3)


def _gptq_stage():
  return rules_transform([(KERNELS, gptq(QSpec(bits=4, group_size=32)))])


def _run(model_dir, **options):
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  windows = random_windows(8, 32)
  opts = RunnerOptions(batch_size=4, show_progress=False, **options)
  return quantize_blocks(blocks, [_gptq_stage()], windows, options=opts, run_id={"test": 1})


def _codes(qblocks):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(qblocks)]


def test_statistics_are_the_true_sequential_inputs(model_dir):
  """Each linear's Hessian is XᵀX/n of its inputs with the earlier groups already quantized."""
  seen = {}

  def record(w, stats):
    seen[w.shape, len(seen)] = stats
    return w

  stage = rules_transform([(KERNELS, per_leaf(record, stats=frozenset({"hessian", "imatrix", "abs_mean"})))])
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  windows = random_windows(4, 16)
  quantize_blocks(blocks, [stage], windows[:, :], options=RunnerOptions(batch_size=2, show_progress=False))
  # Recompute the first block's q_proj input by hand: the embedded windows through the input norm.
  params = blocks.layer_params(0)
  h = np.concatenate([np.asarray(blocks.embed(blocks.embed_params(), w[None])) for w in windows])
  x = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + blocks.config.rms_norm_eps) * params["input_layernorm"]["scale"]
  x = x.reshape(-1, x.shape[-1])
  first = next(iter(seen.values()))
  np.testing.assert_allclose(first["hessian"], x.T @ x / len(x), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(first["imatrix"], np.mean(x * x, 0), rtol=2e-4)
  np.testing.assert_allclose(first["abs_mean"], np.mean(np.abs(x), 0), rtol=2e-4)
  assert first["tokens"] == len(x)
  assert len(seen) == 3 * 7


def test_only_statistics_no_other_linear_reads_are_handed_over(model_dir):
  """The runner hands a transform the statistics of a linear that shares its input with no other (o_proj, down_proj:
  GPTQ donates their Hessian, 0.8 GB for Llama-3-8B's down_proj); q/k/v's and gate/up's are shared."""
  seen = {}

  def recorder(name):
    def record(w, stats, owned):
      seen.setdefault(name, set()).add(owned)
      return w

    return per_leaf(record, stats=frozenset({"hessian"}), consumes_stats=True)

  names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  stage = rules_transform([(rf"model/layers_\d+/.*/{n}/kernel", recorder(n)) for n in names])
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  quantize_blocks(blocks, [stage], random_windows(4, 16), options=RunnerOptions(batch_size=2, show_progress=False))
  assert seen == {n: {n in ("o_proj", "down_proj")} for n in names}


def test_windows_embedded_from_the_host_table_equal_the_device_tables(model_dir):
  """A table on the host sends only the rows the windows use to the device: the same hidden states."""
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  ids = jax.numpy.asarray(random_windows(3, 16))
  host = blocks.embed_params()
  assert isinstance(host["model"]["embed_tokens"]["embedding"], np.ndarray)
  device = jax.tree.map(jax.numpy.asarray, host)
  np.testing.assert_array_equal(np.asarray(blocks.embed(host, ids)), np.asarray(blocks.embed(device, ids)))


def test_gptq_through_the_runner_beats_rtn_on_block_outputs(model_dir):
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  windows = random_windows(8, 32)
  opts = RunnerOptions(batch_size=4, show_progress=False)
  q_gptq, h_gptq = quantize_blocks(blocks, [_gptq_stage()], windows, options=opts)
  rtn_stage = rules_transform([(KERNELS, rtn(QSpec(bits=4, group_size=32)))])
  _, h_rtn = quantize_blocks(blocks, [rtn_stage], windows, options=opts)
  _, h_float = quantize_blocks(blocks, [], windows, options=opts)
  assert np.mean((h_gptq - h_float) ** 2) < np.mean((h_rtn - h_float) ** 2)
  assert dequantize(q_gptq[0]["mlp"]["down_proj"]["kernel"]).shape == (128, 64)


def test_resume_after_interruption_gives_the_identical_result(model_dir, tmp_path):
  expected, h_expected = _run(model_dir)
  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(Interrupted):
    _run(model_dir, checkpoint_dir=ckpt, stop_after_block=2)
  resumed, h_resumed = _run(model_dir, checkpoint_dir=ckpt)
  for a, b in zip(_codes(expected), _codes(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(h_expected, h_resumed)


def test_checkpoint_from_another_configuration_is_refused(model_dir, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(Interrupted):
    _run(model_dir, checkpoint_dir=ckpt, stop_after_block=1)
  blocks = LlamaBlocks(SafetensorsCheckpoint(model_dir))
  opts = RunnerOptions(batch_size=4, show_progress=False, checkpoint_dir=ckpt)
  with pytest.raises(ValueError, match=r"different configuration \(differs in \['bits'\]\)"):
    quantize_blocks(blocks, [_gptq_stage()], random_windows(8, 32), options=opts, run_id={"test": 1, "bits": 3})


SHARDED = """
import numpy as np, jax
from jax.sharding import Mesh
from qjax.calib.runner import RunnerOptions, quantize_blocks
from qjax.core import QSpec, dequantize
from qjax.models import SafetensorsCheckpoint
from qjax.models.blocks import LlamaBlocks
from qjax.transforms import gptq
from qjax.transforms.rules import rules_transform
from tests.model_factory import random_windows
assert len(jax.devices()) == 8
blocks = LlamaBlocks(SafetensorsCheckpoint({path!r}))
stage = rules_transform([(r"model/layers_\\d+/.*_proj/kernel", gptq(QSpec(bits=4, group_size=32)))])
windows = random_windows(16, 32)
single, h1 = quantize_blocks(blocks, [stage], windows, options=RunnerOptions(batch_size=8, show_progress=False))
mesh = jax.make_mesh((8,), ("data",))
stage = rules_transform([(r"model/layers_\\d+/.*_proj/kernel", gptq(QSpec(bits=4, group_size=32), mesh=mesh))])
options = RunnerOptions(batch_size=8, mesh=mesh, show_progress=False)
sharded, h8 = quantize_blocks(blocks, [stage], windows, options=options)
mismatch = [np.mean(np.asarray(a) != np.asarray(b)) for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded))]
print("max code mismatch", max(mismatch))
assert max(mismatch) < 1e-3, mismatch
np.testing.assert_allclose(h1, h8, rtol=1e-3, atol=1e-3)
"""


def test_calibration_split_over_eight_devices_matches_one(model_dir):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
    [sys.executable, "-c", SHARDED.format(path=model_dir)],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
