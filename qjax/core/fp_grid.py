"""Floating-point weight grids: FP8 E4M3 with a scale per output channel, MXFP4 (OCP Microscaling: E2M1
values sharing a power-of-two E8M0 scale per 32 inputs) and NVFP4 (E2M1 values, an E4M3 scale per 16 inputs and a
float32 scale per tensor).

All implement `qjax.core.grid.Grid`, so RTN, GPTQ (its grid refresh at group boundaries included) and AWQ's
search round into them as they round into the affine grid. Codes are the formats' own bit patterns (E2M1: sign,
two exponent bits, one mantissa bit; E4M3 "fn": sign, four exponent bits with bias 7, three mantissa bits, no
infinities, 0x7F/0xFF NaN), so a code is what a checkpoint stores. Rounding is to nearest, ties to even, by XLA's
conversion to ``float4_e2m1fn`` / ``float8_e4m3fn``, after clipping to the largest finite value (the formats'
saturating conversion).

References: OCP Microscaling Formats (MX) v1.0 §5.3 and §6.3; OCP 8-bit Floating Point v1.0 (E4M3);
compressed-tensors ``float-quantized`` and ``nvfp4-pack-quantized`` (``quantization/utils/helpers.py``
``generate_gparam``, ``calculate_qparams``); NVIDIA's NVFP4 (Blackwell block-scaled FP4: 16 values per E4M3 scale).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer

from qjax.core.grid import GroupParams

E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of E2M1's largest normal value, 6 = 1.5 * 2**2
E4M3_MAX = 448.0
E8M0_BIAS = 127
E4M3_ZERO_SCALE = 0.125  # what compressed-tensors puts where an E4M3 scale rounds to 0 (so no division by 0)
_FLOAT32 = np.dtype(np.float32)


def e2m1_codes(x: Float[Array, "..."]) -> Integer[Array, "..."]:
  """4-bit E2M1 codes (uint8 in [0, 16)) of `x`, rounded to nearest even and saturated at ±6; zero is always
  code 0, never -0 (code 8), as llama.cpp and compressed-tensors' CPU packer write it."""
  f4 = jnp.clip(x, -E2M1_MAX, E2M1_MAX).astype(jnp.float4_e2m1fn)
  codes = jax.lax.bitcast_convert_type(f4, jnp.uint4).astype(jnp.uint8)
  return jnp.where(codes == 8, jnp.uint8(0), codes)


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
  scale_bits: ClassVar[int] = 8

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


def nvfp4_global_scale(amax: Float[Array, ""]) -> Float[Array, ""]:
  """NVFP4's per-tensor scale for a tensor whose largest magnitude is `amax`: the power of two nearest below
  ``448 * 6 / amax`` (1 for an all-zero tensor).

  compressed-tensors divides by it (``W = e2m1 * e4m3(scale) / global_scale``) and takes ``448 * 6 / amax`` itself;
  rounding it down to a power of two keeps the largest group's scale in E4M3's top binade, (224, 448], and makes the
  division exact, so every reader (float32, bfloat16, a kernel that multiplies by the reciprocal) decodes the same
  values. E4M3's normal range spans 15 binades below that, so only groups under ``2**-15`` of the tensor's largest
  magnitude lose scale precision either way.
  """
  amax = jnp.asarray(amax, jnp.float32)
  _, exponent = jnp.frexp(E4M3_MAX * E2M1_MAX / jnp.where(amax > 0, amax, 1.0))  # x = m * 2**e, m in [0.5, 1)
  return jnp.where(amax > 0, jnp.ldexp(jnp.float32(1.0), exponent - 1), 1.0)  # exact, unlike log2 and exp2


def valid_global_scale(x: float) -> bool:
  """Whether `x` can be an NVFP4 global scale read from a file: positive, finite, and small enough a divisor that
  the largest code times the largest scale stays a finite float32."""
  return 0 < x < np.inf and E4M3_MAX * E2M1_MAX / x <= np.finfo(np.float32).max


UNFIXED_MSG = (
  "NvFp4Grid has no global scale yet; fix it per matrix with spec.for_tensor(max|w|) (rtn_quantize and "
  "gptq_quantize do) or give NvFp4Grid(global_scale=...)."
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class NvFp4Grid:
  """NVFP4: E2M1 codes, one E4M3 scale per group (16 inputs in the format), one float32 scale per tensor.

  ``W = e2m1(code) * e4m3(scale) / global_scale``, as compressed-tensors' ``nvfp4-pack-quantized`` stores it. A
  group's scale is ``max|w| / 6`` in units of ``1 / global_scale``, rounded to E4M3 (saturating at 448; a scale
  that rounds to 0 becomes 0.125, as compressed-tensors does); ``params.scale`` holds the E4M3 code bytes.

  Attributes:
    global_scale: the per-tensor divisor; None until a quantizer fixes it from the whole matrix (`for_tensor`,
      `nvfp4_global_scale`), since GPTQ fits a group at a time.

  Examples:
    >>> w = np.array([0.1, -0.2, 0.35, 0.05], np.float32).reshape(1, 4, 1)
    >>> grid = NvFp4Grid().for_tensor(np.abs(w).max())
    >>> params = grid.fit(w)
    >>> grid.global_scale, float(e4m3_values(params.scale)[0, 0])  # 0.35 / 6 * 4096 = 238.9 -> 240
    (4096.0, 240.0)
    >>> grid.round(w, params, np.arange(4))[1][0, :, 0].tolist()
    [0.087890625, -0.17578125, 0.3515625, 0.05859375]
  """

  bits: int = 4
  global_scale: float | None = None
  scale_bits: ClassVar[int] = 8

  @property
  def fixed(self) -> bool:
    return self.global_scale is not None

  def for_tensor(self, amax: Float[Array, ""]) -> "NvFp4Grid":
    scale = nvfp4_global_scale(amax)
    return NvFp4Grid(global_scale=scale if isinstance(scale, jax.core.Tracer) else float(scale))

  def _divisor(self) -> Float[Array, ""]:
    if self.global_scale is None:
      raise ValueError(UNFIXED_MSG)
    return jnp.float32(self.global_scale)

  def fit(self, w: Float[Array, "groups group out"], importance=None) -> GroupParams:
    del importance  # the format fixes the scale: the group's largest magnitude
    amax = jnp.max(jnp.abs(w), axis=1)
    codes = e4m3_codes(amax / E2M1_MAX * self._divisor())
    return GroupParams(jnp.where(codes == 0, e4m3_codes(jnp.float32(E4M3_ZERO_SCALE)), codes), None)

  def _scales(self, params: GroupParams) -> Float[Array, "groups 1 out"]:
    return (e4m3_values(params.scale) / self._divisor())[:, None]

  def round(self, w, params: GroupParams, positions: Int[Array, " rows"]):
    del positions
    scale = self._scales(params)
    codes = e2m1_codes(w / scale)
    return codes, e2m1_values(codes) * scale

  def dequantize(self, codes, params: GroupParams, positions: Int[Array, " rows"]):
    del positions
    return e2m1_values(codes) * self._scales(params)
