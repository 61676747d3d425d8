"""The rounding-grid protocol: a grid defined here plugs into RTN and GPTQ alone; llama.cpp's block grids."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import AffineGrid, GgmlGrid, GroupParams, QSpec, dequantize, ggml, quantize
from qjax.core.ggml_decode import decode
from qjax.core.ggml_kquants import encode
from qjax.core.qarray import group_view
from qjax.formats import open_checkpoint
from qjax.quantizers import gptq_quantize, rtn_quantize


@dataclasses.dataclass(frozen=True)
class Codebook:
  """A 4-level non-uniform grid: each group's values are ``scale * LEVELS[code]``, scale = max |w| of the group."""

  levels: tuple[float, ...] = (-1.0, -0.25, 0.25, 1.0)
  bits: int = 2

  def fit(self, w, importance=None):
    return GroupParams(jnp.maximum(jnp.max(jnp.abs(w), axis=1), 1e-12))

  def round(self, w, params, positions):
    points = params.scale[:, None, :, None] * jnp.asarray(self.levels)[None, None, None]  # (groups, 1, out, levels)
    codes = jnp.argmin(jnp.abs(w[..., None] - points), axis=-1).astype(jnp.uint8)
    return codes, self.dequantize(codes, params, positions)

  def dequantize(self, codes, params, positions):
    return params.scale[:, None, :] * jnp.asarray(self.levels)[codes.astype(jnp.int32)]


@pytest.fixture(scope="module")
def q_proj_problem():
  """Layer 0's q_proj of the default model and the Hessian of its real inputs (normed embeddings of real text)."""
  from qjax.calib import text as texts

  checkpoint = open_checkpoint("default")
  tokens = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "calibration"))[:4096]
  layer = checkpoint.layer_params(0)
  h = checkpoint.embed_params()["embedding"][tokens]
  x = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + checkpoint.config.rms_norm_eps) * layer["input_layernorm"]["scale"]
  return np.asarray(layer["self_attn"]["q_proj"]["kernel"]), (x.T @ x / len(x)).astype(np.float32)


def output_error(w, q, h):
  d = np.asarray(dequantize(q), np.float64) - w
  return float(np.einsum("io,ij,jo->", d, h.astype(np.float64), d))


def test_a_codebook_grid_plugs_into_gptq_and_beats_rtn_on_it(q_proj_problem):
  w, h = q_proj_problem
  spec = QSpec(bits=2, group_size=64, grid=Codebook())
  rtn = rtn_quantize(w, spec=spec)
  gptq, info = gptq_quantize(w, h, spec=spec)
  assert bool(info.ok) and gptq.spec.rounding_grid == Codebook()
  # Every value lies on its group's codebook, as the grid defines it.
  groups = group_view(jnp.asarray(dequantize(gptq)), spec) / gptq.scale[:, None, :]
  assert np.abs(np.abs(np.asarray(groups))[..., None] - np.array([0.25, 1.0])).min(-1).max() < 1e-5
  err_rtn, err_gptq = output_error(w, rtn, h), output_error(w, gptq, h)
  assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_a_custom_grid_must_fit_the_code_width():
  with pytest.raises(ValueError, match="a grid of 4-bit codes"):
    QSpec(bits=4, group_size=64, grid=Codebook())
  with pytest.raises(TypeError, match="a grid with fit, round and dequantize"):
    QSpec(bits=2, group_size=64, grid=object())
  assert QSpec(bits=4).has_default_grid and not QSpec(bits=2, grid=Codebook()).has_default_grid


@pytest.mark.parametrize("type_name", list(ggml.BLOCK_TYPES))
def test_ggml_grids_round_onto_the_values_llama_cpp_decodes(type_name):
  """``round(w, fit(w))`` on a block grid gives llama.cpp's own decoded values (its k-quant encoders re-round the
  codes on the stored scales); the 32-element and IQ4 types round against the unrounded scale in C, so a few
  ties differ."""
  w = np.random.default_rng(1).standard_t(5, size=(512, 24)).astype(np.float32)
  grid = GgmlGrid(type_name)
  spec = QSpec.ggml(type_name)
  groups = group_view(jnp.asarray(w), spec)
  params = grid.fit(groups)
  codes, values = grid.round(groups, params, jnp.arange(spec.group_size))
  np.testing.assert_array_equal(grid.dequantize(codes, params, jnp.arange(spec.group_size)), values)
  ours = np.asarray(values).reshape(512, 24)
  llama = np.asarray(decode(encode(w.T, type_name), type_name)).T
  same = np.mean(ours == llama)
  if type_name.endswith("_K"):
    assert same == 1.0
  else:
    assert same > 0.99, same
  assert np.abs(ours - w).max() <= np.abs(llama - w).max() * 1.01


def test_gptq_rounds_into_a_llama_cpp_grid_through_the_protocol(q_proj_problem):
  """The grid refits blocks on GPTQ's updated weights; codes land on llama.cpp's Q4_0 grid and lower the output
  error against llama.cpp's own rounding (packing them into blocks is the export's job)."""
  w, h = q_proj_problem
  from qjax.quantizers.gptq import _gptq_arrays

  spec = QSpec(bits=4, group_size=32, grid=GgmlGrid("Q4_0"))
  codes, params, _, info = _gptq_arrays(jnp.asarray(w), jnp.asarray(h), spec=spec, config=_config())
  values = np.asarray(spec.rounding_grid.dequantize(group_view(codes, spec), params, jnp.arange(32))).reshape(w.shape)
  d = values.astype(np.float64) - w
  gptq_err = float(np.einsum("io,ij,jo->", d, h, d))
  llama = np.asarray(decode(encode(w.T, "Q4_0"), "Q4_0")).T.astype(np.float64) - w
  llama_err = float(np.einsum("io,ij,jo->", llama, h, llama))
  assert bool(info.ok) and gptq_err < 0.8 * llama_err, (gptq_err, llama_err)


def _config():
  from qjax.quantizers import GptqConfig

  return GptqConfig()


def test_rtn_into_the_default_grid_is_unchanged():
  w = np.random.default_rng(0).standard_normal((128, 8)).astype(np.float32)
  spec = QSpec(bits=4, group_size=32)
  explicit = QSpec(bits=4, group_size=32, grid=spec.rounding_grid)
  assert explicit == spec and explicit.has_default_grid
  np.testing.assert_array_equal(quantize(w, spec).codes, quantize(w, explicit).codes)


def test_a_replaced_spec_derives_its_grid_again():
  three = dataclasses.replace(QSpec(bits=4, group_size=32, symmetric=False), bits=3)
  assert three.rounding_grid == AffineGrid(bits=3, symmetric=False, scale_dtype=np.float16)
  with pytest.raises(ValueError, match="3-bit codes"):
    QSpec(bits=3, grid=AffineGrid(bits=4, symmetric=True, scale_dtype=np.float16))


@pytest.mark.parametrize("type_name", list(ggml.BLOCK_TYPES))
def test_gptq_into_a_block_grid_writes_the_values_it_chose(type_name):
  """GPTQ's codes and refitted scales, packed into llama.cpp's blocks, decode (gguf-py's numpy dequantizer and
  llama.cpp's own) to exactly the values GPTQ's sweep rounded to, and beat llama.cpp's rounding on H."""
  import gguf

  from qjax.quantizers import GptqConfig
  from qjax.quantizers import gptq as gptq_module
  from tests import ggml_oracle

  rng = np.random.default_rng(2)
  x = (rng.standard_normal((1024, 512)) @ (np.eye(512) + rng.standard_normal((512, 512)) / 16)).astype(np.float32)
  w = rng.standard_t(5, size=(512, 16)).astype(np.float32)
  h = x.T @ x / len(x)
  spec, config = QSpec.ggml(type_name), GptqConfig(group_aware=True)

  def traced(w, h):  # gptq_quantize's own steps, with the sweep's codes and scales kept from before their packing
    codes, params, perm, info = gptq_module._gptq_arrays(w, h, spec=spec, config=config)
    return gptq_module._as_qarray(codes, params, perm, w, spec), info, (codes, params)

  q, info, (codes, params) = jax.jit(traced)(jnp.asarray(w), jnp.asarray(h))
  chosen = spec.rounding_grid.dequantize(group_view(codes, spec), params, jnp.arange(spec.group_size))
  chosen = np.asarray(chosen).reshape(w.shape)
  decoded = gguf.quants.dequantize(np.asarray(q.codes), gguf.GGMLQuantizationType[type_name]).T
  np.testing.assert_array_equal(decoded, chosen)
  np.testing.assert_array_equal(np.asarray(dequantize(q)), chosen)
  if ggml_oracle.library() is not None:
    np.testing.assert_array_equal(ggml_oracle.dequantize(np.asarray(q.codes), type_name).T, chosen)
  llama = np.asarray(decode(encode(w.T, type_name, np.diag(h)), type_name)).T
  err = lambda v: float(np.einsum("io,ij,jo->", v - w, h, v - w))
  assert bool(info.ok) and err(chosen) < err(llama), (err(chosen), err(llama))
