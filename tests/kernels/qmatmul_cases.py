"""Problem cases and the tolerance table shared by the qmatmul kernel tests."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from qjax.core import QArray, QSpec, from_codes, round_to_grid

# max |out - ref| / max |ref| per activation dtype. Kernels that dequantize like the reference
# differ only in f32 summation order, then in the output's rounding (1 ulp: 2^-8 for bfloat16,
# 2^-11 for float16); kernels that scale in the activation dtype round the scale once more.
TOLERANCE = {np.dtype(jnp.float32): 1e-5, np.dtype(jnp.float16): 2e-3, np.dtype(jnp.bfloat16): 1.6e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  """One ``x @ W`` problem: ``lead`` token dims, W of (k, n) quantized to 4 bits."""

  lead: tuple[int, ...]
  k: int
  n: int
  group: int
  symmetric: bool
  dtype: str
  act_order: bool = False
  scale_dtype: str = "float16"

  def make(self, seed: int) -> tuple[jnp.ndarray, QArray]:
    """Fresh random activations and a quantized random weight."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((self.k, self.n)).astype(np.float32)
    spec = QSpec(bits=4, group_size=self.group, symmetric=self.symmetric, scale_dtype=self.scale_dtype)
    perm = rng.permutation(self.k) if self.act_order else None
    codes, params = round_to_grid(w if perm is None else w[perm], spec)
    q = from_codes(codes, params, spec, perm=perm)
    x = jnp.asarray(rng.standard_normal((*self.lead, self.k)), self.dtype)
    return x, q


def assert_close(out, ref, dtype) -> None:
  """Kernel output vs reference: same shape and dtype, finite (unwritten tiles are NaN), within tolerance."""
  assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out).all(), f"{np.size(out) - np.isfinite(out).sum()} output elements are not finite"
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert err <= TOLERANCE[np.dtype(dtype)], f"relative error {err:.2e} > {TOLERANCE[np.dtype(dtype)]:.0e}"


# Tails everywhere: m is 1, 3, 17 or a batch; n and k are not multiples of the blocks the tests
# use (PortableConfig(8, 64, 64) etc.), groups of 32, 64, 128 and per channel.
PORTABLE = {
  "m1_g128_sym_bf16": Case((1,), 256, 96, 128, True, "bfloat16"),
  "m3_g32_asym_f16_ntail": Case((3,), 160, 40, 32, False, "float16"),
  "m17_g64_asym_f32_actorder": Case((17,), 192, 136, 64, False, "float32", act_order=True),
  "m17_perchannel_sym_bf16_ktail": Case((17,), 200, 72, -1, True, "bfloat16"),
  "b2x3_g128_asym_bf16_actorder": Case((2, 3), 384, 200, 128, False, "bfloat16", act_order=True),
  "m5_g32_sym_f32_bf16scales": Case((5,), 96, 24, 32, True, "float32", scale_dtype="bfloat16"),
}
# Mosaic TPU: k a multiple of 128, groups of 64, 128 or per channel, bfloat16|float32.
TPU = {
  "m1_g128_sym_bf16": Case((1,), 256, 96, 128, True, "bfloat16"),
  "m3_g64_asym_f32_ntail": Case((3,), 384, 200, 64, False, "float32"),
  "m17_perchannel_asym_bf16_actorder": Case((17,), 640, 136, -1, False, "bfloat16", act_order=True),
  "b2x3_g128_asym_bf16_actorder": Case((2, 3), 512, 264, 128, False, "bfloat16", act_order=True),
}
# Hopper: n a multiple of 128, bfloat16|float16, groups of 32, 64, 128 or per channel.
HOPPER = {
  "m1_g128_sym_bf16": Case((1,), 512, 256, 128, True, "bfloat16"),
  "m3_g32_asym_f16_actorder": Case((3,), 256, 128, 32, False, "float16", act_order=True),
  "m17_perchannel_asym_bf16": Case((17,), 512, 256, -1, False, "bfloat16"),
  "b2x3_g64_sym_bf16": Case((2, 3), 384, 128, 64, True, "bfloat16"),
}
