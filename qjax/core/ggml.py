"""ggml block quantization types: sizes and layouts (the facts of `ggml-common.h`)."""

from typing import NamedTuple


class BlockType(NamedTuple):
  """One ggml block type.

  Attributes:
    type_id: the `GGMLQuantizationType` value.
    block_size: elements per block (32, or 256 for the k-quants).
    type_size: bytes per block.
    bits: nominal code width.
    symmetric: True when the block has no minimum / zero term.
  """

  type_id: int
  block_size: int
  type_size: int
  bits: int
  symmetric: bool

  @property
  def bits_per_weight(self) -> float:
    return self.type_size * 8 / self.block_size


QK_K = 256

BLOCK_TYPES: dict[str, BlockType] = {
  "Q4_0": BlockType(2, 32, 18, 4, True),
  "Q4_1": BlockType(3, 32, 20, 4, False),
  "Q5_0": BlockType(6, 32, 22, 5, True),
  "Q5_1": BlockType(7, 32, 24, 5, False),
  "Q8_0": BlockType(8, 32, 34, 8, True),
  "Q2_K": BlockType(10, QK_K, 84, 2, False),
  "Q3_K": BlockType(11, QK_K, 110, 3, True),
  "Q4_K": BlockType(12, QK_K, 144, 4, False),
  "Q5_K": BlockType(13, QK_K, 176, 5, False),
  "Q6_K": BlockType(14, QK_K, 210, 6, True),
  # Non-linear: codes index a fixed table of 16 levels (`qjax.core.ggml_iq4`).
  "IQ4_NL": BlockType(20, 32, 18, 4, True),
  "IQ4_XS": BlockType(23, QK_K, 136, 4, True),
  # E2M1 codes sharing an E8M0 power-of-two scale per 32 (`qjax.core.ggml_mxfp4`).
  "MXFP4": BlockType(39, 32, 17, 4, True),
}
NON_LINEAR = ("IQ4_NL", "IQ4_XS", "MXFP4")
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""``kvalues_iq4nl`` (ggml-common.h): the 16 levels of an IQ4 code, in units of the block's scale."""
MXFP4_LEVELS = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
"""``kvalues_mxfp4``: E2M1 values doubled, by 4-bit code (sign in bit 3), in units of half the block's scale."""
LEVELS = {"IQ4_NL": IQ4_LEVELS, "IQ4_XS": IQ4_LEVELS, "MXFP4": MXFP4_LEVELS}
"""The level table of each non-linear type."""
