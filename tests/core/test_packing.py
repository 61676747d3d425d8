import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.core import packing


def _reference_stream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Packs a 1-D code vector as a little-endian bit stream, one bit at a time."""
  stream = np.zeros(len(codes) * bits, np.uint8)
  for t, code in enumerate(codes):
    for b in range(bits):
      stream[bits * t + b] = (int(code) >> b) & 1
  words = stream.reshape(-1, 32).astype(np.uint64)
  return (words << np.arange(32, dtype=np.uint64)).sum(axis=1).astype(np.uint32)


@given(
  bits=st.sampled_from(packing.SUPPORTED_BITS),
  periods=st.integers(1, 4),
  cols=st.integers(1, 5),
  axis=st.sampled_from([0, 1]),
  seed=st.integers(0, 2**16),
)
def test_pack_unpack_roundtrip(bits, periods, cols, axis, seed):
  n = periods * packing.codes_per_period(bits)
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=(n, cols), dtype=np.uint8)
  if axis == 1:
    codes = codes.T
  words = packing.pack(codes, bits, axis=axis)
  assert words.dtype == jnp.uint32
  assert words.shape[axis] == packing.packed_length(n, bits)
  np.testing.assert_array_equal(packing.unpack(words, bits, axis=axis), codes)


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_pack_is_a_little_endian_bit_stream(bits):
  codes = np.random.default_rng(bits).integers(0, 2**bits, size=64)
  np.testing.assert_array_equal(packing.pack(codes, bits), _reference_stream_pack(codes, bits))


def test_three_bit_gptq_layout():
  # formats.md §1.3: code 10 straddles words 0/1 (2 low bits at 30-31, bit 2 at word1 bit 0).
  codes = np.zeros(32, np.uint8)
  codes[10] = 0b101
  words = np.asarray(packing.pack(codes, 3))
  assert words.tolist() == [0b01 << 30, 0b1, 0]
  codes = np.zeros(32, np.uint8)
  codes[21] = 0b011
  assert np.asarray(packing.pack(codes, 3)).tolist() == [0, 1 << 31, 0b01]


def test_four_bit_sym_zero_constant():
  # formats.md §1.4: eight v1 zeros of 7 pack to 0x77777777.
  assert int(packing.pack(np.full(8, 7), 4)[0]) == 0x77777777


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_pack_under_jit_and_vmap(bits):
  period = packing.codes_per_period(bits)
  codes = np.random.default_rng(0).integers(0, 2**bits, size=(3, 2 * period, 4), dtype=np.uint8)
  pack = jax.jit(jax.vmap(lambda c: packing.pack(c, bits)))
  unpack = jax.jit(jax.vmap(lambda w: packing.unpack(w, bits)))
  np.testing.assert_array_equal(unpack(pack(codes)), codes)


def test_int32_words_are_reinterpreted():
  codes = np.full(8, 15, np.uint8)
  words = np.asarray(packing.pack(codes, 4)).view(np.int32)
  assert words[0] == -1
  np.testing.assert_array_equal(packing.unpack(words, 4), codes)


def test_bad_bits_and_lengths():
  with pytest.raises(ValueError, match="bits in"):
    packing.pack(np.zeros(32, np.uint8), 7)
  with pytest.raises(ValueError, match="multiple of 32 for 3-bit"):
    packing.pack(np.zeros(16, np.uint8), 3)
