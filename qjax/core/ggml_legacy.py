"""Bit-exact encoders of ggml's 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the block plumbing.

Without an importance matrix these are llama.cpp's ``quantize_row_q*_ref``: the scale comes from the block's range
and codes round by truncating ``v + 0.5`` (``roundf`` for Q8_0). With one they are ``quantize_row_q*_impl``:
weights ``qw_i * sqrt(sigma2 + x_i^2)``, with ``sigma2`` the mean square of the whole row, drive the scale
searches of `ggml_exact`. Q8_0 ignores the importance matrix, as llama.cpp does.

Blocks are laid out element-first, ``(block_size, nb)``, as `ggml_exact` expects; `nb` counts all blocks of all
rows in row order.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int, UInt8

from qjax.core.ggml_exact import Exact, make_qkx_quants, make_qx_quants, running_extreme, signed_abs_max

ByteRows = list[Int[Array, "bytes nb"]]
SEARCH_CHUNK = 8  # blocks per step of an encoder with a search: small enough for L1 (measured 4 to 64)


def to_blocks(rows: Float[Array, "n k"], block_size: int) -> Float[Array, "block_size nb"]:
  """Rows of consecutive blocks, element-first."""
  return rows.reshape(-1, block_size).T


def block_importance(imatrix: Float[Array, " k"], n: int, block_size: int) -> Float[Array, "block_size nb"]:
  """The importance of each element of each block: the same (k,) vector for every row."""
  per_row = imatrix.reshape(-1, block_size).T
  return jnp.broadcast_to(per_row[:, None, :], (block_size, n, per_row.shape[1])).reshape(block_size, -1)


def map_chunks(fn: Callable[..., Any], arrays: tuple[Array, ...], *, chunk: int | None) -> Any:
  """Applies `fn` to `chunk` blocks at a time (block axis last in its inputs and outputs) and joins the outputs.

  A chunk's intermediates stay in cache, where XLA would otherwise stream several full-size temporaries through
  memory at every step of a search. Blocks are padded with zeros to whole chunks and the padding dropped.
  `chunk` None applies `fn` once to all blocks (for encoders without a search).
  """
  if chunk is None:
    return fn(*arrays)
  nb = arrays[0].shape[-1]
  chunks = -(-nb // chunk)
  padded = [jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, chunks * chunk - nb)]) for a in arrays]
  out = lax.map(lambda args: fn(*args), [jnp.moveaxis(a.reshape(*a.shape[:-1], chunks, chunk), -2, 0) for a in padded])
  return jax.tree.map(lambda o: jnp.moveaxis(o, 0, -2).reshape(*o.shape[1:-1], -1)[..., :nb], out)


def to_rows(parts: ByteRows, n: int) -> UInt8[Array, "n row_bytes"]:
  """Each block's fields (bytes along axis 0, blocks along axis 1) laid out as `n` rows of blocks."""
  return (jnp.concatenate(parts, axis=0) & 0xFF).astype(jnp.uint8).T.reshape(n, -1)


def encode_blocks(encoder: Callable[..., ByteRows], arrays: tuple[Array, ...], n: int, *, chunk: int | None):
  """`encoder`'s block bytes, computed chunk by chunk, as `n` rows."""
  return to_rows([map_chunks(lambda *a: jnp.concatenate(encoder(*a), axis=0), arrays, chunk=chunk)], n)


def fp16_bytes(x: Float[Array, " nb"]) -> Int[Array, "2 nb"]:
  """Little-endian bytes of ``GGML_FP32_TO_FP16(x)`` (round to nearest even, as numpy's astype)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16).astype(jnp.int32)
  return jnp.stack([bits & 0xFF, bits >> 8])


def fp16_round(x: Float[Array, "..."]) -> Float[Array, "..."]:
  """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``: what llama.cpp reads back from a stored scale."""
  return x.astype(jnp.float16).astype(jnp.float32)


def nibbles_by_halves(q: Int[Array, "32 nb"]) -> Int[Array, "16 nb"]:
  """Byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble."""
  return (q[:16] & 0xF) | ((q[16:] & 0xF) << 4)


def fifth_bits(q: Int[Array, "32 nb"]) -> Int[Array, "4 nb"]:
  """Bit 4 of element ``e`` at bit ``e`` of a little-endian uint32 (Q5_0/Q5_1 ``qh``)."""
  bits = ((q >> 4) & 1).reshape(4, 8, -1) << jnp.arange(8)[None, :, None]
  return jnp.sum(bits, axis=1)  # disjoint bits: the sum is an OR


def _inverse(ex: Exact, d: Array) -> Array:
  """``d ? 1/d : 0``."""
  return jnp.where(d != 0, ex.div(np.float32(1.0), d), 0.0)


def _truncate(v: Array) -> Array:
  """C's float-to-integer conversion (toward zero), of values that are non-negative here."""
  return v.astype(jnp.int32)


def _symmetric_ref(ex: Exact, x: Array, half: int) -> tuple[Array, Array]:
  """Q4_0/Q5_0 reference: ``d = max / -half`` from the signed largest magnitude, codes ``v/d + half`` truncated
  after adding 0.5."""
  _, mx = signed_abs_max(x)
  d = ex.div(mx, np.float32(-half))
  q = _truncate(ex.mul(x, _inverse(ex, d)[None]) + np.float32(half + 0.5))
  return d, jnp.minimum(2 * half - 1, q)


def _affine_ref(ex: Exact, x: Array, nmax: int) -> tuple[Array, Array, Array]:
  """Q4_1/Q5_1 reference: ``d = (max - min) / nmax``, codes ``(v - min)/d`` truncated after adding 0.5."""
  mn = running_extreme(x, larger=False)
  d = ex.div(running_extreme(x, larger=True) - mn, np.float32(nmax))
  return d, mn, _truncate(ex.mul(x - mn[None], _inverse(ex, d)[None]) + np.float32(0.5))


def _q4_0_ref(ex, x):
  d, q = _symmetric_ref(ex, x, 8)
  return [fp16_bytes(d), nibbles_by_halves(q)]


def _q5_0_ref(ex, x):
  d, q = _symmetric_ref(ex, x, 16)
  return [fp16_bytes(d), fifth_bits(q), nibbles_by_halves(q)]


def _q4_1_ref(ex, x):
  d, mn, q = _affine_ref(ex, x, 15)
  return [fp16_bytes(d), fp16_bytes(mn), nibbles_by_halves(jnp.minimum(15, q))]


def _q5_1_ref(ex, x):
  d, mn, q = _affine_ref(ex, x, 31)
  q = q & 0xFF  # C stores `(uint8_t)(v + 0.5f)` with no clamp
  return [fp16_bytes(d), fp16_bytes(mn), fifth_bits(q), nibbles_by_halves(q)]


def _q8_0(ex, x):
  d = ex.div(jnp.max(jnp.abs(x), axis=0), np.float32(127))
  q = lax.round(ex.mul(x, _inverse(ex, d)[None]), lax.RoundingMethod.AWAY_FROM_ZERO)  # C's roundf
  return [fp16_bytes(d), q.astype(jnp.int32)]


def _weights(ex: Exact, x: Array, qw: Array, sigma2: Array) -> Array:
  """``qw_i * sqrt(sigma2 + x_i^2)``: the importance matrix scaled by each weight's own magnitude."""
  return ex.mul(qw, jnp.sqrt(sigma2[None] + ex.mul(x, x)))


def _q4_0_impl(ex, x, w):
  d, q = make_qx_quants(ex, x, w, nmax=8)
  return [fp16_bytes(d), nibbles_by_halves(q)]


def _q5_0_impl(ex, x, w):
  d, q = make_qx_quants(ex, x, w, nmax=16)
  return [fp16_bytes(d), fifth_bits(q), nibbles_by_halves(q)]


def _affine_impl(ex, x, w, nmax):
  return make_qkx_quants(ex, x, w, nmax=nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)


def _q4_1_impl(ex, x, w):
  d, the_min, q = _affine_impl(ex, x, w, 15)
  return [fp16_bytes(d), fp16_bytes(-the_min), nibbles_by_halves(q)]


def _q5_1_impl(ex, x, w):
  d, the_min, q = _affine_impl(ex, x, w, 31)
  return [fp16_bytes(d), fp16_bytes(-the_min), fifth_bits(q), nibbles_by_halves(q)]


REFERENCE: dict[str, Callable[[Exact, Array], ByteRows]] = {
  "Q4_0": _q4_0_ref,
  "Q4_1": _q4_1_ref,
  "Q5_0": _q5_0_ref,
  "Q5_1": _q5_1_ref,
  "Q8_0": _q8_0,
}
WEIGHTED: dict[str, Callable[[Exact, Array, Array], ByteRows]] = {
  "Q4_0": _q4_0_impl,
  "Q4_1": _q4_1_impl,
  "Q5_0": _q5_0_impl,
  "Q5_1": _q5_1_impl,
}


def row_sigma2(ex: Exact, rows: Float[Array, "n k"]) -> Float[Array, " n"]:
  """``sum_j x_j^2 / k`` per row, summed in C order."""
  n, k = rows.shape
  return ex.div(ex.csum_chunks(ex.mul(rows, rows).T.reshape(k // 32, 32, n)), np.float32(k))


def encode_rows(
  ex: Exact, rows: Float[Array, "n k"], type_name: str, imatrix: Float[Array, " k"] | None
) -> UInt8[Array, "n row_bytes"]:
  """Encodes float32 rows of a 32-element block type (see `qjax.quantizers.kquants.encode`)."""
  n, k = rows.shape
  x = to_blocks(rows, 32)
  if imatrix is None or type_name not in WEIGHTED:
    return encode_blocks(functools.partial(REFERENCE[type_name], ex), (x,), n, chunk=None)
  sigma2 = jnp.repeat(row_sigma2(ex, rows), k // 32)

  def encoder(x, qw, sigma2):
    return WEIGHTED[type_name](ex, x, _weights(ex, x, qw, sigma2))

  return encode_blocks(encoder, (x, block_importance(imatrix, n, 32), sigma2), n, chunk=SEARCH_CHUNK)
