"""llama.cpp's MXFP4 block type, bit-exact: 32 E2M1 codes sharing one E8M0 (power-of-two) scale.

A block is the scale's exponent byte ``e`` and 16 bytes of codes (weight ``j`` in the low nibble of byte ``j``,
weight ``j + 16`` in its high nibble). llama.cpp keeps E2M1 doubled, as the integer levels ``ggml.MXFP4_LEVELS``
(0, 1, 2, 3, 4, 6, 8, 12 and their negatives), against half the scale: a weight decodes to
``2**(e - 128) * MXFP4_LEVELS[code]``. ``quantize_row_mxfp4_ref`` sets ``e = floor(log2f(max|x|)) - 2 + 127``
(OCP MX's shared exponent) and gives each weight the first of the 16 levels whose ``|level * d - x|`` is
smallest: ties go to the lower index, not to the even mantissa as OCP's conversion (`qjax.core.fp_grid`) does.
``ggml_quantize_chunk`` ignores an importance matrix for this type.

References: llama.cpp ``ggml-quants.c`` (``quantize_row_mxfp4_ref``, ``best_index_mxfp4``,
``dequantize_row_mxfp4``), ``ggml-impl.h`` (``ggml_e8m0_to_fp32_half``), ``ggml-common.h`` (``kvalues_mxfp4``).
"""

import functools

import numpy as np
from jax import numpy as jnp
from jaxtyping import Array, Float, Int

from qjax.core import ggml
from qjax.core.ggml_decode import e8m0_half
from qjax.core.ggml_exact import Exact
from qjax.core.ggml_iq4 import pack_codes
from qjax.core.ggml_legacy import ByteRows

LEVELS = np.array(ggml.MXFP4_LEVELS, np.int32)


@functools.cache
def _log2f_round_up_thresholds() -> np.ndarray:
  """For each frexp exponent E (index E + 149): the smallest mantissa m in [0.5, 1) whose ``log2f(m * 2**E)``
  rounds up to E itself, as a correctly rounded float32 log2 does (2.0 when none does)."""
  out = np.full(149 + 129, 2.0, np.float32)
  for e in range(-148, 129):
    lo, hi = np.float32(0.5).view(np.uint32), np.float32(1.0).view(np.uint32)  # m in [lo, hi) as bit patterns
    if np.float32(e + np.log2(np.float64(np.uint32(hi - 1).view(np.float32)))) != e:
      continue
    while lo < hi:  # the first mantissa that rounds up
      mid = (lo + hi) // 2
      rounds_up = np.float32(e + np.log2(np.float64(np.uint32(mid).view(np.float32)))) == e
      lo, hi = (lo, mid) if rounds_up else (mid + 1, hi)
    out[e + 149] = np.uint32(lo).view(np.float32)
  return out


def floor_log2f(x: Float[Array, "..."]) -> Int[Array, "..."]:
  """``floorf(log2f(x))`` for positive finite float32 `x`, with a correctly rounded ``log2f``: the exact exponent,
  or one more for values within half an ulp of the next power of two."""
  mantissa, exponent = jnp.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
  thresholds = _log2f_round_up_thresholds()  # built on first use, not when qjax is imported
  rounds_up = mantissa >= jnp.asarray(thresholds)[jnp.clip(exponent + 149, 0, thresholds.size - 1)]
  return jnp.where(rounds_up, exponent, exponent - 1)


def nearest_level(ex: Exact, x: Float[Array, "..."], d: Float[Array, "..."]) -> Int[Array, "..."]:
  """``best_index_mxfp4(x, d)``: the first code of least ``|LEVELS[code] * d - x|``, in float32."""
  levels = jnp.asarray(LEVELS.astype(np.float32)).reshape((1,) * x.ndim + (16,))
  err = jnp.abs(ex.hide(levels * d[..., None]) - x[..., None])  # level * d is exact: a power of two times <= 12
  return jnp.argmin(err, axis=-1)


def mxfp4_bytes(ex: Exact, x: Float[Array, "32 nb"], qw: Float[Array, "32 nb"] | None = None) -> ByteRows:
  """MXFP4 blocks: the exponent byte and 16 bytes of codes (``quantize_row_mxfp4_ref``; `qw` is ignored, as
  llama.cpp ignores an importance matrix for MXFP4)."""
  del qw
  amax = jnp.max(jnp.abs(x), axis=0)
  e = jnp.where(amax > 0, jnp.clip(floor_log2f(jnp.where(amax > 0, amax, 1.0)) - 2 + 127, 0, 255), 0)
  codes = nearest_level(ex, x, jnp.broadcast_to(e8m0_half(e)[None], x.shape))
  return [e[None].astype(jnp.int32), pack_codes(codes)]
