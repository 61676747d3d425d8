"""Decoding ggml blocks to float32: llama.cpp's `dequantize_row_*` (`ggml-quants.c`), vectorized over blocks.

Every product here is of small integers and an fp16 scale, so it is exact in float32; the one rounding per value
(the final add or subtract of the minimum) is the same as in C whether or not XLA contracts it into an FMA. The
results therefore equal llama.cpp's and gguf-py's dequantizers bit for bit.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, UInt8

from qjax.core import ggml


def block_type(type_name: str, *, caller: str) -> ggml.BlockType:
  """The `ggml.BlockType` of `type_name`, or a ValueError naming `caller` and the allowed types."""
  if type_name not in ggml.BLOCK_TYPES:
    raise ValueError(f"`{caller}` expected type_name in {tuple(ggml.BLOCK_TYPES)}, got {type_name!r}.")
  return ggml.BLOCK_TYPES[type_name]


def fp16_field(blocks: UInt8[Array, "nb bytes"], offset: int) -> Float[Array, "nb 1"]:
  """The little-endian fp16 at byte `offset` of each block, as float32."""
  bits = blocks[:, offset].astype(jnp.uint16) | (blocks[:, offset + 1].astype(jnp.uint16) << 8)
  return lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)[:, None]


def unpack_k4_scales(scales: UInt8[Array, "... 12"]) -> tuple[Int[Array, "... 8"], Int[Array, "... 8"]]:
  """6-bit scales and mins of Q4_K/Q5_K (`get_scale_min_k4`): bytes 0-3 scales, 4-7 mins, 8-11 low nibbles of 4-7.

  Sub-blocks 0-3 keep their 6 bits in the low bits of bytes 0-7; sub-blocks 4-7 split theirs into a nibble of
  bytes 8-11 and the top two bits of bytes 0-7.
  """
  s = scales.astype(jnp.int32)
  low_sc, low_m, packed = s[..., 0:4], s[..., 4:8], s[..., 8:12]
  sc = jnp.concatenate([low_sc & 63, (packed & 0xF) | ((low_sc >> 6) << 4)], axis=-1)
  m = jnp.concatenate([low_m & 63, (packed >> 4) | ((low_m >> 6) << 4)], axis=-1)
  return sc, m


def unpack_q3_scales(scales: UInt8[Array, "nb 12"]) -> Int[Array, "nb 16"]:
  """Signed 6-bit scales of Q3_K, in [-32, 31]: low nibbles in bytes 0-7, top two bits in bytes 8-11.

  Scale ``j`` has its low nibble in byte ``j % 8`` (low half for ``j < 8``) and its top bits at bit
  ``2 * (j // 4)`` of byte ``8 + j % 4``.
  """
  s = scales.astype(jnp.int32)
  low = jnp.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=-1)
  shifts = 2 * (jnp.arange(16) // 4)
  high = (jnp.tile(s[:, 8:12], 4) >> shifts[None]) & 3
  return (low | (high << 4)) - 32


def _nibbles_by_halves(qs: UInt8[Array, "nb half"]) -> Int[Array, "nb 2*half"]:
  """Element ``j`` in the low nibble of byte ``j``, element ``j + half`` in its high nibble."""
  q = qs.astype(jnp.int32)
  return jnp.concatenate([q & 0xF, q >> 4], axis=-1)


def _bit_planes(bits: UInt8[Array, "nb 32"], planes: int) -> Int[Array, "nb 32*planes"]:
  """Bit ``e // 32`` of byte ``e % 32``: the high bits of Q3_K/Q5_K, element ``e`` in block order."""
  b = bits.astype(jnp.int32)[:, None, :] >> jnp.arange(planes)[None, :, None]
  return (b & 1).reshape(b.shape[0], -1)


def _crumbs(qs: UInt8[Array, "nb 64"]) -> Int[Array, "nb 256"]:
  """2-bit codes of Q2_K/Q3_K: element ``128h + 32k + l`` at bits ``2k`` of byte ``32h + l``."""
  q = qs.astype(jnp.int32).reshape(-1, 2, 1, 32) >> (2 * jnp.arange(4))[None, None, :, None]
  return (q & 3).reshape(q.shape[0], 256)


def _k_nibbles(qs: UInt8[Array, "nb 128"]) -> Int[Array, "nb 256"]:
  """4-bit codes of Q4_K/Q5_K: per 64 elements, the first 32 in low nibbles, the next 32 in high nibbles."""
  q = qs.astype(jnp.int32).reshape(-1, 4, 1, 32)
  return jnp.concatenate([q & 0xF, q >> 4], axis=2).reshape(q.shape[0], 256)


def _q4_0(b):
  d = fp16_field(b, 0)
  return (_nibbles_by_halves(b[:, 2:18]) - 8).astype(jnp.float32) * d


def _q4_1(b):
  d, m = fp16_field(b, 0), fp16_field(b, 2)
  return _nibbles_by_halves(b[:, 4:20]).astype(jnp.float32) * d + m


def _five_bit(qh: UInt8[Array, "nb 4"], qs: UInt8[Array, "nb 16"]) -> Int[Array, "nb 32"]:
  """Q5_0/Q5_1 codes: nibbles as Q4_0, bit 4 of element ``e`` at bit ``e`` of the little-endian uint32 `qh`."""
  high = (qh.astype(jnp.int32)[:, :, None] >> jnp.arange(8)[None, None]) & 1
  return _nibbles_by_halves(qs) | (high.reshape(-1, 32) << 4)


def _q5_0(b):
  d = fp16_field(b, 0)
  return (_five_bit(b[:, 2:6], b[:, 6:22]) - 16).astype(jnp.float32) * d


def _q5_1(b):
  d, m = fp16_field(b, 0), fp16_field(b, 2)
  return _five_bit(b[:, 4:8], b[:, 8:24]).astype(jnp.float32) * d + m


def _q8_0(b):
  d = fp16_field(b, 0)
  return lax.bitcast_convert_type(b[:, 2:34], jnp.int8).astype(jnp.float32) * d


def _per_sub_block(values: Int[Array, "nb 256"], scale, offset, sub: int) -> Float[Array, "nb 256"]:
  """``scale * values - offset`` with one (scale, offset) per run of `sub` elements; `offset` may be None."""
  v = values.astype(jnp.float32).reshape(values.shape[0], -1, sub) * scale[..., None]
  if offset is not None:
    v = v - offset[..., None]
  return v.reshape(values.shape[0], -1)


def _q2_k(b):
  sc = b[:, 0:16].astype(jnp.int32)
  d, dmin = fp16_field(b, 80), fp16_field(b, 82)
  return _per_sub_block(_crumbs(b[:, 16:80]), d * (sc & 0xF), dmin * (sc >> 4), 16)


def _q3_k(b):
  d = fp16_field(b, 108)
  # A set high bit means "no subtraction": codes are low2 - 4 * (1 - hbit), in [-4, 3].
  q = _crumbs(b[:, 32:96]) - 4 * (1 - _bit_planes(b[:, 0:32], 8))
  return _per_sub_block(q, d * unpack_q3_scales(b[:, 96:108]), None, 16)


def _q4_k(b):
  d, dmin = fp16_field(b, 0), fp16_field(b, 2)
  sc, m = unpack_k4_scales(b[:, 4:16])
  return _per_sub_block(_k_nibbles(b[:, 16:144]), d * sc, dmin * m, 32)


def _q5_k(b):
  d, dmin = fp16_field(b, 0), fp16_field(b, 2)
  sc, m = unpack_k4_scales(b[:, 4:16])
  q = _k_nibbles(b[:, 48:176]) | (_bit_planes(b[:, 16:48], 8) << 4)
  return _per_sub_block(q, d * sc, dmin * m, 32)


def _q6_k(b):
  ql = b[:, 0:128].astype(jnp.int32).reshape(-1, 2, 2, 32)  # [half, which 32 bytes, lane]
  # Quarters 0, 1 of each half are the low nibbles of the two 32-byte runs, quarters 2, 3 their high nibbles.
  low = jnp.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
  qh = b[:, 128:192].astype(jnp.int32).reshape(-1, 2, 1, 32) >> (2 * jnp.arange(4))[None, None, :, None]
  q = (low | ((qh & 3) << 4)).reshape(-1, 256) - 32
  sc = lax.bitcast_convert_type(b[:, 192:208], jnp.int8).astype(jnp.float32)
  return _per_sub_block(q, fp16_field(b, 208) * sc, None, 16)


def _iq4_levels(qs: UInt8[Array, "nb 16*subs"], levels=ggml.IQ4_LEVELS) -> Float[Array, "nb 32*subs"]:
  """Table levels of 4-bit codes: per 32 weights, the first 16 in the low nibbles, the next 16 in the high ones."""
  q = qs.astype(jnp.int32).reshape(qs.shape[0], -1, 1, 16)
  codes = jnp.concatenate([q & 0xF, q >> 4], axis=2).reshape(qs.shape[0], -1)
  return jnp.asarray(levels, jnp.float32)[codes]


def _iq4_nl(b):
  return fp16_field(b, 0) * _iq4_levels(b[:, 2:18])


def iq4_xs_sub_scales(b: UInt8[Array, "nb bytes"]) -> Int[Array, "nb 8"]:
  """The 8 signed 6-bit sub-block scales of IQ4_XS blocks: low nibbles in ``scales_l``, high bits in ``scales_h``."""
  low = b[:, 4:8].astype(jnp.int32)
  low = jnp.stack([low & 0xF, low >> 4], axis=-1).reshape(-1, 8)
  high = (b[:, 2].astype(jnp.int32) | (b[:, 3].astype(jnp.int32) << 8))[:, None] >> (2 * jnp.arange(8))[None]
  return (low | ((high & 3) << 4)) - 32


def _iq4_xs(b):
  dl = fp16_field(b, 0) * iq4_xs_sub_scales(b).astype(jnp.float32)
  return _per_sub_block(_iq4_levels(b[:, 8:136]), dl, None, 32)


def e8m0_half(e: Int[Array, "..."]) -> Float[Array, "..."]:
  """``ggml_e8m0_to_fp32_half``: ``2**(e - 128)`` in float32, MXFP4's half scale (its levels are E2M1 doubled).

  ``e < 2`` gives a subnormal, which XLA:CPU flushes to zero where C keeps it (blocks with max |x| below 2**-124).
  """
  return jnp.ldexp(jnp.float32(1.0), e.astype(jnp.int32) - 128)


def _mxfp4(b):
  return e8m0_half(b[:, 0:1]) * _iq4_levels(b[:, 1:17], ggml.MXFP4_LEVELS)


_DECODERS: dict[str, Callable[[Array], Array]] = {
  "Q4_0": _q4_0,
  "Q4_1": _q4_1,
  "Q5_0": _q5_0,
  "Q5_1": _q5_1,
  "Q8_0": _q8_0,
  "Q2_K": _q2_k,
  "Q3_K": _q3_k,
  "Q4_K": _q4_k,
  "Q5_K": _q5_k,
  "Q6_K": _q6_k,
  "IQ4_NL": _iq4_nl,
  "IQ4_XS": _iq4_xs,
  "MXFP4": _mxfp4,
}


@functools.partial(jax.jit, static_argnames=("type_name",))
def decode(codes: UInt8[Array, "n bytes"], type_name: str) -> Float[Array, "n k"]:
  """Dequantizes rows of ggml blocks, as llama.cpp's ``dequantize_row_<type>`` does.

  Args:
    codes: (n, k / block_size * type_size) uint8: one row of ggml blocks per output channel, as in a GGUF file.
    type_name: one of ``Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4``.

  Returns:
    (n, k) float32.

  Raises:
    ValueError: for an unknown type, a non-uint8 or non-2-D `codes`, or a row that is not whole blocks.

  References:
    llama.cpp ``ggml/src/ggml-quants.c`` ``dequantize_row_*``; checked against ``gguf.quants.dequantize``.

  Examples:
    >>> import numpy as np
    >>> block = np.zeros((1, 34), np.uint8)
    >>> block[0, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    >>> block[0, 2:] = np.arange(-16, 16).astype(np.int8).view(np.uint8)
    >>> decode(block, "Q8_0")[0, :4].tolist()
    [-8.0, -7.5, -7.0, -6.5]
  """
  info = block_type(type_name, caller="decode")
  if codes.ndim != 2 or codes.dtype != jnp.uint8:
    raise ValueError(f"`decode` expected 2-D uint8 codes, got {codes.shape=} {codes.dtype=}.")
  n, row_bytes = codes.shape
  if row_bytes % info.type_size:
    raise ValueError(
      f"`decode` expected rows of whole {type_name} blocks ({info.type_size} bytes each), got {codes.shape=}."
    )
  values = _DECODERS[type_name](codes.reshape(-1, info.type_size))
  return values.reshape(n, row_bytes // info.type_size * info.block_size)
