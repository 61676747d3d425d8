"""llama.cpp's non-linear 4-bit types IQ4_NL and IQ4_XS, bit-exact: codes index a fixed table of 16 levels.

Both round every weight to ``scale * KVALUES[code]``. IQ4_NL keeps one fp16 scale per block of 32; IQ4_XS keeps
one fp16 super-scale per 256 and a signed 6-bit multiple of it per sub-block of 32 (4.25 bits per weight). A
sub-block's scale comes from ``quantize_row_iq4_nl_impl``'s search: start from ``max / 127``, then try
``iscale = (t - 127) / max`` for t in -7..7, keeping the weighted least-squares scale ``sum w q x / sum w q^2``
with the largest ``(sum w q x)^2 / sum w q^2``; weights are ``x^2``, or with an importance matrix
``imatrix_i * sqrt(sigma2 + x_i^2)``. ``ggml_quantize_chunk`` runs that search (7 trials each side) with or
without an importance matrix. Arithmetic is C's, through `qjax.core.ggml_exact.Exact`; blocks are element-first.
"""

import numpy as np
from jax import lax
from jax import numpy as jnp
from jaxtyping import Array, Float, Int

from qjax.core import ggml
from qjax.core.ggml_exact import GROUP_MAX_EPS, Exact, signed_abs_max
from qjax.core.ggml_legacy import ByteRows, fp16_bytes

KVALUES = np.array(ggml.IQ4_LEVELS, np.int32)

NTRY = 7


def best_index(ex: Exact, x: Float[Array, "..."]) -> Int[Array, "..."]:
  """``best_index_int8(16, KVALUES, x)``: the nearest level, the lower one unless the upper is strictly nearer."""
  levels = KVALUES.astype(np.float32)
  above = levels[1:].reshape((1,) * x.ndim + (15,))
  upper = jnp.clip(jnp.sum(x[..., None] >= above, axis=-1) + 1, 1, 15)  # the first level above x (inside)
  hi, lo = jnp.asarray(levels)[upper], jnp.asarray(levels)[upper - 1]
  nearer_low = ex.hide(x - lo) < ex.hide(hi - x)
  inside = jnp.where(nearer_low, upper - 1, upper)
  return jnp.where(x <= levels[0], 0, jnp.where(x >= levels[15], 15, inside))


def _sums(ex: Exact, x, w, codes):
  """``sum w q x`` and ``sum w q^2`` in C order, q the levels of `codes`."""
  q = jnp.asarray(KVALUES.astype(np.float32))[codes]
  wq = ex.mul(w, q)
  return ex.csum(ex.mul(wq, x)), ex.csum(ex.mul(wq, q))


def sub_block_scales(ex: Exact, x: Float[Array, "32 nb"], w: Float[Array, "32 nb"]) -> Float[Array, " nb"]:
  """The search of ``quantize_row_iq4_nl_impl`` for every sub-block of 32: its float scale (0 when empty)."""
  amax, mx = signed_abs_max(x)
  d = ex.div(-mx, np.float32(KVALUES[0]))
  sumqx, sumq2 = _sums(ex, x, w, best_index(ex, ex.mul(ex.div(np.float32(1), d)[None], x)))
  d = jnp.where(sumq2 > 0, ex.div(sumqx, sumq2), 0.0)
  best = ex.mul(d, sumqx)

  def trial(carry, numerator):
    d, best = carry
    sumqx, sumq2 = _sums(ex, x, w, best_index(ex, ex.mul(ex.div(numerator, mx)[None], x)))
    better = (sumq2 > 0) & ex.greater_product(sumqx, sumqx, best, sumq2)
    new_d = ex.div(sumqx, sumq2)
    return (jnp.where(better, new_d, d), jnp.where(better, ex.mul(new_d, sumqx), best)), None

  numerators = np.array([t + KVALUES[0] for t in range(-NTRY, NTRY + 1)], np.float32)
  (d, _), _ = lax.scan(trial, (d, best), numerators)
  return jnp.where(amax < GROUP_MAX_EPS, 0.0, d)


def _weights(ex: Exact, x: Float[Array, "32 ..."], qw, sigma2) -> Array:
  return ex.mul(x, x) if qw is None else ex.mul(qw, jnp.sqrt(sigma2 + ex.mul(x, x)))


def _sigma2(ex: Exact, x: Float[Array, "n ..."]) -> Array:
  """``sigma2 = 0; for j: sigma2 += x[j]*x[j]; sigma2 *= 2.f/n`` over a (super-)block."""
  n = x.shape[0]
  return ex.mul(ex.csum_chunks(ex.mul(x, x).reshape(n // 32, 32, *x.shape[1:])), np.float32(2.0 / n))


def pack_codes(codes: Int[Array, "n nb"]) -> Int[Array, "n/2 nb"]:
  """``q4[16 i + j] = L[32 i + j] | L[32 i + 16 + j] << 4``."""
  c = codes.reshape(-1, 2, 16, codes.shape[-1])
  return (c[:, 0] | (c[:, 1] << 4)).reshape(-1, codes.shape[-1])


def iq4_nl_bytes(ex: Exact, x: Float[Array, "32 nb"], qw: Float[Array, "32 nb"] | None = None) -> ByteRows:
  """IQ4_NL blocks: fp16 ``d`` and 16 bytes of codes (``quantize_iq4_nl``)."""
  w = _weights(ex, x, qw, None if qw is None else _sigma2(ex, x)[None])
  d = sub_block_scales(ex, x, w)
  inverse = jnp.where(d != 0, ex.div(np.float32(1), d), 0.0)
  return [fp16_bytes(d), pack_codes(best_index(ex, ex.mul(inverse[None], x)))]


def iq4_xs_bytes(ex: Exact, x: Float[Array, "256 nb"], qw: Float[Array, "256 nb"] | None = None) -> ByteRows:
  """IQ4_XS super-blocks: fp16 ``d``, ``scales_h``, ``scales_l[4]`` and 128 bytes of codes (``quantize_iq4_xs``)."""
  nb = x.shape[-1]
  xs = x.reshape(8, 32, nb).transpose(1, 0, 2)  # element-first sub-blocks: [l, ib, b]
  sigma2 = None if qw is None else _sigma2(ex, x)[None, None]
  w = _weights(ex, xs, None if qw is None else qw.reshape(8, 32, nb).transpose(1, 0, 2), sigma2)
  scales = sub_block_scales(ex, xs.reshape(32, 8 * nb), w.reshape(32, 8 * nb)).reshape(8, nb)
  _, max_scale = signed_abs_max(scales)
  d = ex.div(-max_scale, np.float32(32))
  inverse = jnp.where(d != 0, ex.div(np.float32(1), d), 0.0)
  levels = jnp.clip(ex.nearest_int(ex.mul(inverse[None], scales)), -32, 31)
  dl = ex.mul(d[None], levels.astype(jnp.float32))
  idl = jnp.where(dl != 0, ex.div(np.float32(1), dl), 0.0)
  codes = best_index(ex, ex.mul(idl[None], xs)).transpose(1, 0, 2).reshape(256, nb)
  stored = levels + 32
  scales_l = (stored[0::2] & 0xF) | ((stored[1::2] & 0xF) << 4)  # (4, nb)
  scales_h = jnp.sum((stored >> 4) << (2 * jnp.arange(8))[:, None], axis=0)  # disjoint bits: a sum is an OR
  return [fp16_bytes(d), jnp.stack([scales_h & 0xFF, scales_h >> 8]), scales_l, pack_codes(codes)]
