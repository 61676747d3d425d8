"""llama.cpp's block types as rounding grids: fitted by llama.cpp's own searches, rounded on the stored scales.

A ggml block (32 or 256 weights of one output channel) stores its scales in a few header bytes (an fp16 scale,
sub-block scales and mins quantized against fp16 super-scales) and one code per weight. As a `Grid`, a group is a
block along the contraction axis: ``fit`` runs llama.cpp's search (`qjax.core.ggml_kquants.encode`, byte-exact,
weighted by the importance matrix when given) and keeps the header bytes; ``round`` picks each weight's nearest
code on the scales *as stored*, ``value = scale * code - offset`` with one (scale, offset) per sub-block. So a
method that rounds column by column (GPTQ) sees exactly the values llama.cpp will decode.

llama.cpp's own encoders are the byte-exact path for round-to-nearest (`qjax.quantizers.kquants`); for the
32-element types they round against the scale before its fp16 rounding, so their codes can differ from
``round``'s on ties, by design of llama.cpp.
"""

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, UInt8

from qjax.core import ggml
from qjax.core.ggml_decode import e8m0_half, fp16_field, iq4_xs_sub_scales, unpack_k4_scales, unpack_q3_scales
from qjax.core.ggml_iq4 import pack_codes
from qjax.core.ggml_kquants import encode, pack_crumbs, pack_high_bits, pack_k_nibbles, pack_q6_codes
from qjax.core.ggml_legacy import ByteRows, fifth_bits, nibbles_by_halves, to_rows
from qjax.core.grid import GroupParams


class _Layout(NamedTuple):
  """Where a block type keeps its scales, and how big its sub-blocks are."""

  header: tuple[tuple[int, int], ...]  # byte ranges of the scale fields, in block order
  sub_block: int  # weights sharing one (scale, offset)


LAYOUTS = {
  "Q4_0": _Layout(((0, 2),), 32),
  "Q4_1": _Layout(((0, 4),), 32),
  "Q5_0": _Layout(((0, 2),), 32),
  "Q5_1": _Layout(((0, 4),), 32),
  "Q8_0": _Layout(((0, 2),), 32),
  "Q2_K": _Layout(((0, 16), (80, 84)), 16),
  "Q3_K": _Layout(((96, 110),), 16),
  "Q4_K": _Layout(((0, 16),), 32),
  "Q5_K": _Layout(((0, 16),), 32),
  "Q6_K": _Layout(((192, 210),), 16),
  "IQ4_NL": _Layout(((0, 2),), 32),
  "IQ4_XS": _Layout(((0, 8),), 32),
  "MXFP4": _Layout(((0, 1),), 32),
}


def header_bytes(blocks: UInt8[Array, "nb type_size"], type_name: str) -> UInt8[Array, "nb header"]:
  """The scale fields of each block, concatenated in block order."""
  return jnp.concatenate([blocks[:, a:b] for a, b in LAYOUTS[type_name].header], axis=1)


def sub_block_affine(header: UInt8[Array, "nb header"], type_name: str) -> tuple[Array, Array]:
  """(nb, subs) float32 ``scale`` and ``offset`` of every sub-block: weights decode to ``scale * code - offset``,
  or for the non-linear types (offset None) to ``scale * ggml.LEVELS[type_name][code]``.

  Codes are unsigned, in ``[0, 2**bits)`` (Q8_0's signed byte ``q`` is code ``q + 128``, Q3_K's and Q6_K's signed
  levels are offset by 4 and 32 as their decoders do). Every product is of an fp16 scale and small integers, so
  exact: the values are llama.cpp's ``dequantize_row_*`` bit for bit.
  """
  match type_name:
    case "Q4_0":
      d = fp16_field(header, 0)
      return d, 8 * d
    case "Q5_0":
      d = fp16_field(header, 0)
      return d, 16 * d
    case "Q8_0":
      d = fp16_field(header, 0)
      return d, 128 * d
    case "Q4_1" | "Q5_1":
      return fp16_field(header, 0), -fp16_field(header, 2)
    case "Q2_K":
      sc = header[:, 0:16].astype(jnp.int32)
      return fp16_field(header, 16) * (sc & 0xF), fp16_field(header, 18) * (sc >> 4)
    case "Q3_K":
      scale = fp16_field(header, 12) * unpack_q3_scales(header[:, 0:12])
      return scale, 4 * scale
    case "Q4_K" | "Q5_K":
      sc, m = unpack_k4_scales(header[:, 4:16])
      return fp16_field(header, 0) * sc, fp16_field(header, 2) * m
    case "Q6_K":
      scale = fp16_field(header, 16) * lax.bitcast_convert_type(header[:, 0:16], jnp.int8).astype(jnp.float32)
      return scale, 32 * scale
    case "IQ4_NL":  # non-linear: the code picks a table level, ``value = scale * IQ4_LEVELS[code]``
      return fp16_field(header, 0), None
    case "IQ4_XS":
      return fp16_field(header, 0) * iq4_xs_sub_scales(header).astype(jnp.float32), None
    case "MXFP4":  # a power of two: dividing by it is exact, so rounding w / scale is llama.cpp's |level * d - x|
      return e8m0_half(header[:, 0:1]), None
  raise ValueError(f"`sub_block_affine` expected a type in {tuple(LAYOUTS)}, got {type_name!r}.")


@dataclasses.dataclass(frozen=True, slots=True)
class GgmlGrid:
  """A llama.cpp block type (``"Q4_K"`` …) as a `qjax.core.grid.Grid`; a group is one block along ``k``.

  Parameters are the blocks' header bytes, (groups, header, out) uint8 in ``GroupParams.scale``.

  Examples:
    >>> import numpy as np
    >>> grid = GgmlGrid("Q4_0")
    >>> w = np.random.default_rng(0).standard_normal((2, 32, 3)).astype(np.float32)
    >>> params = grid.fit(w)
    >>> codes, values = grid.round(w, params, np.arange(32))
    >>> params.scale.shape, bool(np.abs(values - w).max() < 0.5)
    ((2, 2, 3), True)
  """

  type_name: str

  def __post_init__(self):
    if self.type_name not in LAYOUTS:
      raise ValueError(f"`GgmlGrid` expected a type in {tuple(LAYOUTS)}, got {self.type_name!r}.")

  @property
  def bits(self) -> int:
    return 8 if self.type_name == "Q8_0" else ggml.BLOCK_TYPES[self.type_name].bits

  @property
  def block_size(self) -> int:
    return ggml.BLOCK_TYPES[self.type_name].block_size

  def fit(self, w: Float[Array, "groups block out"], importance: Float[Array, "groups block"] | None = None):
    """llama.cpp's search on every block (rows of all the given groups, as ``ggml_quantize_chunk`` sees them)."""
    groups, block, out = w.shape
    if block != self.block_size:
      raise ValueError(f"`GgmlGrid.fit` expected groups of {self.block_size} for {self.type_name}, got {w.shape=}.")
    rows = jnp.transpose(w, (2, 0, 1)).reshape(out, groups * block)
    imatrix = None if importance is None else jnp.reshape(importance, -1)
    info = ggml.BLOCK_TYPES[self.type_name]
    blocks = encode(rows, self.type_name, imatrix).reshape(out * groups, info.type_size)
    header = header_bytes(blocks, self.type_name).reshape(out, groups, -1)
    return GroupParams(jnp.transpose(header, (1, 2, 0)))

  def _affine(self, params: GroupParams, positions: Int[Array, " rows"]) -> tuple[Array, Array | None]:
    """(groups, rows, out) scale and offset (None for the IQ4 types) of the sub-block of each row."""
    groups, h, out = params.scale.shape
    header = jnp.transpose(params.scale, (0, 2, 1)).reshape(groups * out, h)
    sub = jnp.asarray(positions) // LAYOUTS[self.type_name].sub_block
    pick = lambda a: None if a is None else jnp.transpose(jnp.take(a.reshape(groups, out, -1), sub, axis=2), (0, 2, 1))
    return tuple(map(pick, sub_block_affine(header, self.type_name)))

  def round(self, w, params: GroupParams, positions):
    scale, offset = self._affine(params, positions)
    safe = jnp.where(scale == 0, 1.0, scale)
    if offset is None:  # the nearest table level, ties to the first, as llama.cpp's best_index_int8 and _mxfp4
      codes = _nearest_level(jnp.where(scale == 0, 0.0, w / safe), ggml.LEVELS[self.type_name])
    else:
      codes = jnp.where(scale == 0, 0, jnp.clip(jnp.round((w + offset) / safe), 0, (1 << self.bits) - 1))
    codes = codes.astype(jnp.uint8)
    return codes, self.dequantize(codes, params, positions)

  def pack(self, codes: UInt8[Array, "groups block out"], params: GroupParams) -> UInt8[Array, "out row_bytes"]:
    """The ggml blocks of fitted parameters and codes: one row of blocks per output channel, as in a GGUF file.

    Codes chosen by ``round`` (by any method: GPTQ's sweep included) on parameters from ``fit`` decode, through
    llama.cpp's ``dequantize_row_*``, to exactly the values ``round`` returned.
    """
    groups, _, out = codes.shape
    first = lambda a: jnp.transpose(a, (1, 2, 0)).reshape(a.shape[1], out * groups).astype(jnp.int32)
    header, levels = first(params.scale), first(codes)
    return to_rows(block_bytes(self.type_name, header, levels), out)

  def dequantize(self, codes, params: GroupParams, positions):
    scale, offset = self._affine(params, positions)
    if offset is None:
      return scale * jnp.asarray(ggml.LEVELS[self.type_name], jnp.float32)[codes.astype(jnp.int32)]
    return scale * codes.astype(jnp.float32) - offset


def block_bytes(type_name: str, header: Int[Array, "h nb"], codes: Int[Array, "block nb"]) -> ByteRows:
  """A block type's fields in block order, from its header bytes and its codes (element-first)."""
  match type_name:
    case "Q4_0" | "Q4_1" | "IQ4_NL" | "MXFP4":
      return [header, nibbles_by_halves(codes)]
    case "Q5_0" | "Q5_1":
      return [header, fifth_bits(codes), nibbles_by_halves(codes)]
    case "Q8_0":
      return [header, codes ^ 0x80]  # code c is the signed byte c - 128
    case "Q2_K":
      return [header[:16], pack_crumbs(codes), header[16:]]
    case "Q3_K":
      return [pack_high_bits(codes >> 2), pack_crumbs(codes), header]
    case "Q4_K":
      return [header, pack_k_nibbles(codes)]
    case "Q5_K":
      return [header, pack_high_bits(codes >> 4), pack_k_nibbles(codes)]
    case "Q6_K":
      return [*pack_q6_codes(codes), header]
    case "IQ4_XS":
      return [header, pack_codes(codes)]
  raise ValueError(f"`block_bytes` expected a type in {tuple(LAYOUTS)}, got {type_name!r}.")


def _nearest_level(x: Array, table: tuple[int, ...]) -> Array:
  levels = jnp.asarray(table, jnp.float32)
  distance = jnp.abs(x[..., None] - levels.reshape((1,) * x.ndim + (-1,)))
  return jnp.argmin(distance, axis=-1)  # the first of equal distances (IQ4's sorted table: the lower level)
