"""Packing of 2..8-bit integer codes into 32-bit words.

Codes are packed as one continuous little-endian bit stream along a chosen axis:
code ``t`` starts at stream bit ``bits * t`` and word ``w`` holds stream bits
``32 w .. 32 w + 31``. For 2, 4 and 8 bits this is the familiar "lowest bits hold
the first code" packing; for 3 bits it is exactly GPTQ's 32-codes-in-3-words
layout, where codes 10 and 21 straddle word boundaries; 5 and 6 bits follow the
same rule. A *period* is the smallest run of codes that fills whole words
(``32 / gcd(bits, 32)`` codes in ``bits / gcd(bits, 32)`` words).

The loops below run over the codes of one period (at most 32), so the trace
size is independent of the array size.
"""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Integer, UInt32

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


def _check_bits(fn: str, bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"`{fn}` expected bits in {SUPPORTED_BITS}, got {bits=}.")


def codes_per_period(bits: int) -> int:
  """Number of codes that exactly fill `words_per_period(bits)` 32-bit words."""
  return 32 // math.gcd(bits, 32)


def words_per_period(bits: int) -> int:
  """Number of 32-bit words holding `codes_per_period(bits)` codes."""
  return bits // math.gcd(bits, 32)


def packed_length(length: int, bits: int) -> int:
  """Number of words that hold `length` codes (which must fill whole periods)."""
  return length // codes_per_period(bits) * words_per_period(bits)


def _check_length(fn: str, length: int, bits: int, axis: int) -> None:
  period = codes_per_period(bits)
  if length % period:
    raise ValueError(
      f"`{fn}` expected the packed axis to be a multiple of {period} for {bits}-bit "
      f"codes, got length {length} along axis {axis}."
    )


def pack(codes: Integer[Array, "..."], bits: int, *, axis: int = 0) -> UInt32[Array, "..."]:
  """Packs integer codes in ``[0, 2**bits)`` into uint32 words along `axis`.

  Args:
    codes: (..., n, ...) any integer dtype; values must lie in ``[0, 2**bits)``
      (higher bits are discarded).
    bits: code width, one of 2, 3, 4, 5, 6, 8.
    axis: the axis to pack along; its length must be a multiple of
      `codes_per_period(bits)`.

  Returns:
    (..., n * bits / 32, ...) uint32.

  Raises:
    ValueError: for unsupported bits or an axis length that does not fill whole words.

  Examples:
    >>> import numpy as np
    >>> hex(int(pack(np.arange(8), 4)[0]))
    '0x76543210'
  """
  _check_bits("pack", bits)
  codes = jnp.moveaxis(jnp.asarray(codes), axis, 0)
  _check_length("pack", codes.shape[0], bits, axis)
  period, n_words = codes_per_period(bits), words_per_period(bits)
  mask = jnp.uint32((1 << bits) - 1)
  grouped = codes.astype(jnp.uint32).reshape(-1, period, *codes.shape[1:]) & mask
  words = []
  for w in range(n_words):
    word = jnp.zeros_like(grouped[:, 0])
    for t in range(period):
      shift = bits * t - 32 * w  # where code t's lowest bit lands inside word w
      if -bits < shift < 32:
        part = grouped[:, t] << shift if shift >= 0 else grouped[:, t] >> -shift
        word = word | part
    words.append(word)
  packed = jnp.stack(words, axis=1).reshape(-1, *codes.shape[1:])
  return jnp.moveaxis(packed, 0, axis)


def unpack(
  words: UInt32[Array, "..."], bits: int, *, axis: int = 0, dtype: jnp.dtype = jnp.uint8
) -> Integer[Array, "..."]:
  """Inverse of `pack`: unpacks uint32 words along `axis` into codes.

  Args:
    words: (..., m, ...) uint32 (int32 bit patterns are accepted and reinterpreted);
      m must be a multiple of `words_per_period(bits)`.
    bits: code width, one of 2, 3, 4, 5, 6, 8.
    axis: the packed axis.
    dtype: integer dtype of the result.

  Returns:
    (..., m * 32 / bits, ...) `dtype` codes in ``[0, 2**bits)``.
  """
  _check_bits("unpack", bits)
  words = jnp.asarray(words)
  if words.dtype == jnp.int32:
    words = jax.lax.bitcast_convert_type(words, jnp.uint32)
  if words.dtype != jnp.uint32:
    raise TypeError(f"`unpack` expected uint32 or int32 words, got {words.dtype=}.")
  words = jnp.moveaxis(words, axis, 0)
  period, n_words = codes_per_period(bits), words_per_period(bits)
  if words.shape[0] % n_words:
    raise ValueError(
      f"`unpack` expected the packed axis to be a multiple of {n_words} words for "
      f"{bits}-bit codes, got {words.shape[0]} along axis {axis}."
    )
  grouped = words.reshape(-1, n_words, *words.shape[1:])
  mask = jnp.uint32((1 << bits) - 1)
  codes = []
  for t in range(period):
    w, offset = divmod(bits * t, 32)
    value = grouped[:, w] >> offset
    if offset + bits > 32:  # the code straddles into the next word
      value = value | (grouped[:, w + 1] << (32 - offset))
    codes.append((value & mask).astype(dtype))
  unpacked = jnp.stack(codes, axis=1).reshape(-1, *words.shape[1:])
  return jnp.moveaxis(unpacked, 0, axis)
