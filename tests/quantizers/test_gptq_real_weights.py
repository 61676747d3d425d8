"""GPTQ against RTN on the default model's real weights and the Hessians of its real inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.calib.runner import RunnerOptions, _Batches, _BlockRunner
from qjax.core import QSpec, dequantize
from qjax.core.fp_grid import Fp8Grid, MxFp4Grid, NvFp4Grid
from qjax.formats import open_checkpoint
from qjax.models.blocks import SEQUENTIAL_GROUPS, LlamaBlocks
from qjax.quantizers import GptqConfig, gptq_quantize, rtn_quantize

LINEARS = tuple(m for group in SEQUENTIAL_GROUPS for m in group)


@pytest.fixture(scope="module")
def layer_problems():
  """(kernel, Hessian) of every linear in blocks 0 and 6, from 8 windows of 256 tokens of real text."""
  checkpoint = open_checkpoint("default")
  blocks = LlamaBlocks(checkpoint)
  tokens = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "calibration"))
  windows = texts.calibration_windows(tokens, 8, 256)
  h = np.concatenate([np.asarray(blocks.embed(blocks.embed_params(), jnp.asarray(w[None]))) for w in windows])
  batches, runner = _Batches(h, RunnerOptions(batch_size=8)), _BlockRunner(blocks.layer_fn(0))
  problems = {}
  for i in range(7):
    params = jax.tree.map(jnp.asarray, blocks.layer_params(i))
    if i in (0, 6):
      stats = runner.input_stats(params, batches, LINEARS, frozenset({"hessian"}))
      for m in LINEARS:
        module = params[m.split("/")[0]][m.split("/")[1]]
        problems[f"layers_{i}/{m}"] = (np.asarray(module["kernel"]), np.asarray(stats[m]["hessian"]))
    batches.map(lambda _, b, params=params: runner.forward(params, b))
  return problems


def output_error(w, q, h):
  d = np.asarray(dequantize(q), np.float64) - w
  return float(np.einsum("io,ij,jo->", d, h.astype(np.float64), d))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_every_linear_and_act_order_helps(layer_problems, bits):
  spec = QSpec(bits=bits, group_size=128, partial_groups=True)
  ratios, act_gains = {}, []
  for name, (w, h) in layer_problems.items():
    rtn_err = output_error(w, rtn_quantize(w, spec=spec), h)
    plain = output_error(w, gptq_quantize(w, h, spec=spec)[0], h)
    act = output_error(w, gptq_quantize(w, h, spec=spec, config=GptqConfig(act_order=True))[0], h)
    ratios[name] = plain / rtn_err
    act_gains.append(act / plain)
  assert max(ratios.values()) < 1.0, ratios  # ‖XWᵀ − XŴᵀ‖² below RTN's for every linear
  assert np.mean(act_gains) < 1.0, act_gains


@pytest.mark.slow
@pytest.mark.parametrize(
  "spec",
  [
    QSpec(bits=4, group_size=32, grid=MxFp4Grid()),
    QSpec(bits=4, group_size=16, grid=NvFp4Grid()),
    QSpec(bits=8, group_size=-1, grid=Fp8Grid()),
  ],
  ids=["mxfp4", "nvfp4", "fp8_e4m3_per_channel"],
)
def test_gptq_beats_rtn_on_floating_point_grids(layer_problems, spec):
  ratios = {}
  for name, (w, h) in layer_problems.items():
    gptq = output_error(w, gptq_quantize(w, h, spec=spec)[0], h)
    ratios[name] = gptq / output_error(w, rtn_quantize(w, spec=spec), h)
  print({k: round(v, 3) for k, v in ratios.items()})
  assert max(ratios.values()) < 1.0, ratios
  assert np.mean(list(ratios.values())) < 0.9, ratios
