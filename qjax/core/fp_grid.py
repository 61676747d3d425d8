"""Floating-point weight grids: FP8 E4M3 with a scale per output channel, and MXFP4 (OCP Microscaling: E2M1
values sharing a power-of-two E8M0 scale per 32 inputs).

Both implement `qjax.core.grid.Grid`, so RTN, GPTQ (its grid refresh at group boundaries included) and AWQ's
search round into them as they round into the affine grid. Codes are the formats' own bit patterns (E2M1: sign,
two exponent bits, one mantissa bit; E4M3 "fn": sign, four exponent bits with bias 7, three mantissa bits, no
infinities, 0x7F/0xFF NaN), so a code is what a checkpoint stores. Rounding is to nearest, ties to even, by XLA's
conversion to ``float4_e2m1fn`` / ``float8_e4m3fn``, after clipping to the largest finite value (the formats'
saturating conversion).

References: OCP Microscaling Formats (MX) v1.0 §5.3 and §6.3; OCP 8-bit Floating Point v1.0 (E4M3);
compressed-tensors ``float-quantized``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer

from qjax.core.grid import GroupParams

E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of E2M1's largest normal value, 6 = 1.5 * 2**2
E4M3_MAX = 448.0
E8M0_BIAS = 127
_FLOAT32 = np.dtype(np.float32)


def e2m1_codes(x: Float[Array, "..."]) -> Integer[Array, "..."]:
  """4-bit E2M1 codes (uint8 in [0, 16)) of `x`, rounded to nearest even and saturated at ±6."""
  f4 = jnp.clip(x, -E2M1_MAX, E2M1_MAX).astype(jnp.float4_e2m1fn)
  return jax.lax.bitcast_convert_type(f4, jnp.uint4).astype(jnp.uint8)


def e2m1_values(codes: Integer[Array, "..."]) -> Float[Array, "..."]:
  """float32 values of E2M1 codes."""
  return jax.lax.bitcast_convert_type(codes.astype(jnp.uint4), jnp.float4_e2m1fn).astype(jnp.float32)


def e4m3_codes(x: Float[Array, "..."]) -> Integer[Array, "..."]:
  """8-bit E4M3 ("fn") codes (uint8) of `x`, rounded to nearest even and saturated at ±448."""
  f8 = jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
  return jax.lax.bitcast_convert_type(f8, jnp.uint8)


def e4m3_values(codes: Integer[Array, "..."]) -> Float[Array, "..."]:
  """float32 values of E4M3 codes."""
  return jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)


def e8m0_scales(exponents: Integer[Array, "..."]) -> Float[Array, "..."]:
  """float32 ``2**(e - 127)`` of E8M0 scale bytes (255, NaN in the format, is never written)."""
  return jnp.ldexp(jnp.float32(1.0), exponents.astype(jnp.int32) - E8M0_BIAS)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MxFp4Grid:
  """MXFP4: E2M1 codes, one E8M0 scale per group (32 inputs in the format).

  A group's scale is OCP MX's shared exponent ``2**(floor(log2(max|w|)) - 2)``, which puts the group's largest
  magnitude in E2M1's top binade [4, 8) (values above 6 saturate); ``params.scale`` holds the biased exponent byte.

  Examples:
    >>> w = np.array([0.1, -0.2, 0.35, 0.05], np.float32).reshape(1, 4, 1)
    >>> grid = MxFp4Grid()
    >>> params = grid.fit(w)
    >>> int(params.scale[0, 0]) - 127, grid.round(w, params, np.arange(4))[1][0, :, 0].tolist()
    (-4, [0.09375, -0.1875, 0.375, 0.0625])
  """

  bits: int = 4

  def fit(self, w: Float[Array, "groups group out"], importance=None) -> GroupParams:
    del importance  # the format fixes the scale: the group's largest magnitude
    amax = jnp.max(jnp.abs(w), axis=1)
    exponent = jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))).astype(jnp.int32) - E2M1_EMAX
    exponent = jnp.where(amax > 0, exponent, -E8M0_BIAS)  # an all-zero group: the smallest scale
    return GroupParams(jnp.clip(exponent + E8M0_BIAS, 0, 254).astype(jnp.uint8), None)

  def round(self, w, params: GroupParams, positions: Int[Array, " rows"]):
    del positions
    scale = e8m0_scales(params.scale)[:, None]
    codes = e2m1_codes(w / scale)
    return codes, e2m1_values(codes) * scale

  def dequantize(self, codes, params: GroupParams, positions: Int[Array, " rows"]):
    del positions
    return e2m1_values(codes) * e8m0_scales(params.scale)[:, None]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Fp8Grid:
  """FP8 E4M3 codes with a float scale per group (per output channel in the usual ``group_size=-1``).

  A group's scale is ``max|w| / 448`` rounded to `scale_dtype`, so its largest magnitude maps to E4M3's largest
  finite value (compressed-tensors' and vLLM's FP8 weights).

  Examples:
    >>> w = np.array([1.0, -0.3, 0.01, 2.0], np.float32).reshape(1, 4, 1)
    >>> grid = Fp8Grid()
    >>> codes, values = grid.round(w, grid.fit(w), np.arange(4))
    >>> [round(float(v), 4) for v in values[0, :, 0]]  # -0.3 / scale = -67.2: E4M3's step there is 8
    [1.0, -0.2857, 0.01, 2.0]
  """

  bits: int = 8
  scale_dtype: np.dtype = _FLOAT32

  def fit(self, w: Float[Array, "groups group out"], importance=None) -> GroupParams:
    del importance
    amax = jnp.max(jnp.abs(w), axis=1)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(self.scale_dtype)
    return GroupParams(scale, None)

  def round(self, w, params: GroupParams, positions: Int[Array, " rows"]):
    del positions
    scale = params.scale.astype(jnp.float32)[:, None]
    codes = e4m3_codes(w / scale)
    return codes, e4m3_values(codes) * scale

  def dequantize(self, codes, params: GroupParams, positions: Int[Array, " rows"]):
    del positions
    return e4m3_values(codes) * params.scale.astype(jnp.float32)[:, None]
