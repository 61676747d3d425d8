"""llama.cpp's block encoders, bit-exact: k-quants (Q2_K..Q6_K) and, through `ggml_legacy`, the 32-element types.

A k-quant super-block of 256 weights has 16 sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 8 of 32 (Q4_K, Q5_K). Each
sub-block gets a scale (and for Q2_K, Q4_K, Q5_K a min) from a weighted least-squares search; the sub-block scales
are then themselves quantized to 4, 6 or 8 bits against one fp16 super-scale, and the codes are re-rounded against
the scales as stored. Without an importance matrix this is ``quantize_row_q*_K_ref``; with one it is
``quantize_row_q*_K_impl`` (weights ``imatrix_i * sqrt(sigma2 + x_i^2)``, a second search for the sub-block scales),
exactly as ``ggml_quantize_chunk`` produces them.

Per-type encoders on element-first blocks (see `ggml_exact`) first, then the public `encode`. Encoders with a
search run `SEARCH_CHUNK` super-blocks at a time so that their temporaries stay in cache; Q3_K without an
importance matrix also finishes its coordinate descent over the whole tensor at once.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, UInt8

from qjax.core import ggml, ggml_decode, ggml_iq4, ggml_legacy, ggml_mxfp4
from qjax.core.ggml_exact import (
  GROUP_MAX_EPS,
  Descent,
  Exact,
  make_qkx_quants,
  make_qp_quants,
  make_qx_quants,
  q3_descend,
  q3_result,
  q3_start,
  signed_abs_max,
)
from qjax.core.ggml_legacy import SEARCH_CHUNK, ByteRows, encode_blocks, fp16_bytes, fp16_round, map_chunks

QK_K = ggml.QK_K
TYPE_NAMES = tuple(ggml.BLOCK_TYPES)
ROW_CHUNK_ELEMENTS = 1 << 24
"""Weights `encode` hands to one jitted call at most, in whole rows (each row's blocks are encoded on their own, so
the bytes do not change): the search's temporaries take several times their input, and an embedding-sized matrix
(0.5B weights for Llama 3's vocabulary) would otherwise need several times its 2 GB at once. 16M weights (64 MB)
are a few hundred MB of temporaries, and more per call gains nothing measurable."""
_Q3_K_BYTES_CHUNK = 64  # Q3_K's last stage has no search, so bigger chunks pay (measured 8 to 128)


def _sub_blocks(xt: Float[Array, "256 nb"], size: int) -> Float[Array, "size subs nb"]:
  """Element-first sub-blocks: ``[l, j, b]`` is element ``size*j + l`` of block ``b``."""
  return xt.reshape(QK_K // size, size, -1).transpose(1, 0, 2)


def _super_blocks(levels: Int[Array, "size subs nb"]) -> Int[Array, "256 nb"]:
  return levels.transpose(1, 0, 2).reshape(QK_K, -1)


def _positive_max(v: Float[Array, "subs nb"]) -> Float[Array, " nb"]:
  """``m = 0; for j: if (v[j] > m) m = v[j]``."""
  m = jnp.max(v, axis=0)
  return jnp.where(m > 0, m, 0.0)


def _sigma2(ex: Exact, xt: Float[Array, "256 nb"], *, factor: float) -> Float[Array, " nb"]:
  """``factor * sum x^2 / 256`` over the super-block, summed in C order."""
  sum_x2 = ex.csum_chunks(ex.mul(xt, xt).reshape(8, 32, -1))
  return ex.div(ex.mul(np.float32(factor), sum_x2), np.float32(QK_K))


def _importance(ex: Exact, xs: Array, qw: Array, sigma2: Array) -> Array:
  """``qw_i * sqrt(sigma2 + x_i^2)`` on element-first sub-blocks."""
  return ex.mul(qw, jnp.sqrt(sigma2[None, None] + ex.mul(xs, xs)))


def _requantize(ex: Exact, xs, d, dm, levels, *, lo: int, hi: int, offset: int) -> Int[Array, "size subs nb"]:
  """Final codes against the stored scales: ``nearest_int((x + dm) / d)`` where ``d != 0``, else the search's."""
  v = xs if dm is None else xs + dm[None]
  fresh = jnp.clip(ex.nearest_int(ex.div(v, d[None])), lo, hi) + offset
  return jnp.where(d[None] != 0, fresh, levels)


# ---- packing (element e of a super-block; see formats.md §4) ----


def pack_crumbs(levels: Int[Array, "256 nb"]) -> Int[Array, "64 nb"]:
  """2-bit codes: element ``128h + 32k + l`` at bits ``2k`` of byte ``32h + l``."""
  q = (levels.reshape(2, 4, 32, -1) & 3) << (2 * jnp.arange(4))[None, :, None, None]
  return jnp.sum(q, axis=1).reshape(64, -1)  # disjoint bits: the sum is an OR


def pack_high_bits(bits: Int[Array, "256 nb"]) -> Int[Array, "32 nb"]:
  """Bit ``e // 32`` of byte ``e % 32`` (Q3_K ``hmask``, Q5_K ``qh``)."""
  return jnp.sum(bits.reshape(8, 32, -1) << jnp.arange(8)[:, None, None], axis=0)


def pack_k_nibbles(levels: Int[Array, "256 nb"]) -> Int[Array, "128 nb"]:
  """4-bit codes: per 64 elements, the first 32 in low nibbles, the next 32 in high nibbles."""
  q = levels.reshape(4, 2, 32, -1) & 0xF
  return (q[:, 0] | (q[:, 1] << 4)).reshape(128, -1)


def pack_q6_codes(levels: Int[Array, "256 nb"]) -> ByteRows:
  """Q6_K's ``ql`` (low nibbles) and ``qh`` (high two bits) of 6-bit codes."""
  q = levels.reshape(2, 4, 32, -1)
  low = q & 0xF
  ql = jnp.stack([low[:, 0] | (low[:, 2] << 4), low[:, 1] | (low[:, 3] << 4)], axis=1).reshape(128, -1)
  qh = jnp.sum((q >> 4) << (2 * jnp.arange(4))[None, :, None, None], axis=1).reshape(64, -1)
  return [ql, qh]


def _pack_k4_scales(ls: Int[Array, "8 nb"], lm: Int[Array, "8 nb"]) -> Int[Array, "12 nb"]:
  """The 12 scale bytes of Q4_K/Q5_K from byte-valued (uint8) levels, with C's ORs into uint8."""
  return jnp.concatenate(
    [
      ls[:4] | ((ls[4:] >> 4) << 6),
      lm[:4] | ((lm[4:] >> 4) << 6),
      (ls[4:] & 0xF) | ((lm[4:] & 0xF) << 4),
    ]
  )


def _pack_q3_scales(s6: Int[Array, "16 nb"]) -> Int[Array, "12 nb"]:
  """The 12 scale bytes of Q3_K from 6-bit levels (the inverse of `ggml_decode.unpack_q3_scales`)."""
  high = (s6.reshape(4, 4, -1) >> 4) << (2 * jnp.arange(4))[:, None, None]
  return jnp.concatenate([(s6[:8] & 0xF) | ((s6[8:] & 0xF) << 4), jnp.sum(high, axis=0)])


def _int8(v: Int[Array, "..."]) -> Int[Array, "..."]:
  """An int assigned to C's ``int8_t``: wraps modulo 256."""
  return ((v + 128) & 0xFF) - 128


# ---- Q2_K ----


def _q2_k_bytes(ex: Exact, xs, levels, d, dmin, sc_bytes) -> ByteRows:
  d, dmin = fp16_round(d), fp16_round(dmin)
  levels = _requantize(
    ex, xs, d[None] * (sc_bytes & 0xF), ex.mul(dmin[None], sc_bytes >> 4), levels, lo=0, hi=3, offset=0
  )
  return [sc_bytes, pack_crumbs(_super_blocks(levels)), fp16_bytes(d), fp16_bytes(dmin)]


def _q2_k_ref(ex: Exact, xt):
  xs = _sub_blocks(xt, 16)
  scales, mins, levels = make_qkx_quants(ex, xs, jnp.abs(xs), nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
  max_scale, max_min = _positive_max(scales), _positive_max(mins)
  ls = ex.nearest_int(ex.mul(ex.div(np.float32(15), max_scale)[None], scales))
  lm = ex.nearest_int(ex.mul(ex.div(np.float32(15), max_min)[None], mins))
  sc_bytes = jnp.where(max_scale[None] > 0, ls & 0xFF, 0) | jnp.where(max_min[None] > 0, (lm << 4) & 0xFF, 0)
  d = jnp.where(max_scale > 0, ex.div(max_scale, np.float32(15)), 0.0)
  dmin = jnp.where(max_min > 0, ex.div(max_min, np.float32(15)), 0.0)
  return _q2_k_bytes(ex, xs, levels, d, dmin, sc_bytes)


def _q2_k_impl(ex: Exact, xt, qw):
  xs = _sub_blocks(xt, 16)
  w = _importance(ex, xs, _sub_blocks(qw, 16), _sigma2(ex, xt, factor=1.0))
  scales, mins, levels = make_qkx_quants(ex, xs, w, nmax=3, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
  sw = ex.csum(w)
  d, ls = make_qp_quants(ex, scales, sw, nmax=15)
  dmin, lm = make_qp_quants(ex, mins, sw, nmax=15)
  return _q2_k_bytes(ex, xs, levels, d, dmin, (ls | (lm << 4)) & 0xFF)


# ---- Q3_K ----


def _q3_k_bytes(ex: Exact, xs, levels, d, s6) -> ByteRows:
  sc_bytes = _pack_q3_scales(s6)
  d = fp16_round(d)
  sc = ggml_decode.unpack_q3_scales(sc_bytes.T).T  # what C reads back from the packed bytes
  levels = _super_blocks(_requantize(ex, xs, d[None] * sc, None, levels, lo=-4, hi=3, offset=4))
  return [pack_high_bits(levels >> 2), pack_crumbs(levels), sc_bytes, fp16_bytes(d)]


def _q3_k_ref_bytes(ex: Exact, xt, *descent):
  xs = _sub_blocks(xt, 16)
  scales, levels = q3_result(ex, xs, Descent(*descent), nmax=4)
  _, max_scale = signed_abs_max(scales)
  iscale = ex.div(np.float32(-32), max_scale)
  s6 = jnp.clip(_int8(ex.nearest_int(ex.mul(iscale[None], scales))), -32, 31) + 32
  nonzero = max_scale != 0
  d = jnp.where(nonzero, ex.div(np.float32(1), iscale), 0.0)
  return _q3_k_bytes(ex, xs, levels, d, jnp.where(nonzero[None], s6, 0))


def _q3_k_ref(ex: Exact, xt, n: int):
  """Q3_K without an importance matrix, in three stages: make_q3_quants' coordinate descent starts chunk by chunk
  and finishes over all sub-blocks of the tensor at once, where `ggml_exact.descend` can drop the groups that
  are done."""
  st = map_chunks(lambda xt: q3_start(ex, _sub_blocks(xt, 16), nmax=4), (xt,), chunk=SEARCH_CHUNK)
  st = q3_descend(ex, _sub_blocks(xt, 16), st, nmax=4)
  return encode_blocks(functools.partial(_q3_k_ref_bytes, ex), (xt, *st), n, chunk=_Q3_K_BYTES_CHUNK)


def _q3_k_impl(ex: Exact, xt, qw):
  xs = _sub_blocks(xt, 16)
  w = _importance(ex, xs, _sub_blocks(qw, 16), _sigma2(ex, xt, factor=2.0))
  scales, levels = make_qx_quants(ex, xs, w, nmax=4)
  d, s6 = make_qx_quants(ex, scales, ex.csum(w), nmax=32)
  return _q3_k_bytes(ex, xs, levels, d, s6)


# ---- Q4_K, Q5_K ----


def _k4_scales_ref(ex: Exact, scales, mins):
  """6-bit levels of the sub-block scales and mins against their maxima, and the super-scales."""
  max_scale, max_min = _positive_max(scales), _positive_max(mins)
  inv_scale = jnp.where(max_scale > 0, ex.div(np.float32(63), max_scale), 0.0)
  inv_min = jnp.where(max_min > 0, ex.div(np.float32(63), max_min), 0.0)
  ls = jnp.minimum(63, ex.nearest_int(ex.mul(inv_scale[None], scales)) & 0xFF)
  lm = jnp.minimum(63, ex.nearest_int(ex.mul(inv_min[None], mins)) & 0xFF)
  return ls, lm, ex.div(max_scale, np.float32(63)), ex.div(max_min, np.float32(63))


def _k4_scales_impl(ex: Exact, scales, mins, sw, *, clamp: bool):
  """The sub-block scales and mins quantized by `make_qp_quants` with the sub-blocks' total weights."""
  d, ls = make_qp_quants(ex, scales, sw, nmax=63)
  dmin, lm = make_qp_quants(ex, mins, sw, nmax=63)
  if clamp:  # Q5_K clamps to 63, Q4_K stores the byte as is
    ls, lm = jnp.minimum(63, ls), jnp.minimum(63, lm)
  return ls, lm, d, dmin


def _k4_levels(ex: Exact, xs, levels, ls, lm, d, dmin, nmax: int):
  """Packed scales, fp16 super-scales and final codes of Q4_K/Q5_K."""
  sc_bytes = _pack_k4_scales(ls, lm) & 0xFF
  d, dmin = fp16_round(d), fp16_round(dmin)
  sc, m = (v.T for v in ggml_decode.unpack_k4_scales(sc_bytes.T))  # get_scale_min_k4 on the packed bytes
  levels = _requantize(ex, xs, d[None] * sc, ex.mul(dmin[None], m), levels, lo=0, hi=nmax, offset=0)
  return [fp16_bytes(d), fp16_bytes(dmin), sc_bytes], _super_blocks(levels)


def _q4_k_bytes(ex, xs, levels, scale_fields):
  header, levels = _k4_levels(ex, xs, levels, *scale_fields, nmax=15)
  return [*header, pack_k_nibbles(levels)]


def _q5_k_bytes(ex, xs, levels, scale_fields):
  header, levels = _k4_levels(ex, xs, levels, *scale_fields, nmax=31)
  return [*header, pack_high_bits(levels >> 4), pack_k_nibbles(levels)]


def _k4_search_ref(ex: Exact, xt, *, nmax: int, rmin: float, nstep: int):
  """Sub-block search of the Q4_K/Q5_K reference: weights ``sqrt(mean x^2) + |x|`` per sub-block of 32."""
  xs = _sub_blocks(xt, 32)
  sum_x2 = ex.csum(ex.mul(xs, xs))
  w = jnp.sqrt(ex.div(sum_x2, np.float32(32)))[None] + jnp.abs(xs)
  scales, mins, levels = make_qkx_quants(ex, xs, w, nmax=nmax, rmin=rmin, rdelta=0.1, nstep=nstep, use_mad=False)
  return xs, levels, _k4_scales_ref(ex, scales, mins)


def _k4_search_impl(ex: Exact, xt, qw, *, nmax: int, clamp: bool):
  xs = _sub_blocks(xt, 32)
  w = _importance(ex, xs, _sub_blocks(qw, 32), _sigma2(ex, xt, factor=2.0))
  scales, mins, levels = make_qkx_quants(ex, xs, w, nmax=nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
  return xs, levels, _k4_scales_impl(ex, scales, mins, ex.csum(w), clamp=clamp)


def _q4_k_ref(ex, xt):
  return _q4_k_bytes(ex, *_k4_search_ref(ex, xt, nmax=15, rmin=-1.0, nstep=20))


def _q4_k_impl(ex, xt, qw):
  return _q4_k_bytes(ex, *_k4_search_impl(ex, xt, qw, nmax=15, clamp=False))


def _q5_k_ref(ex, xt):
  return _q5_k_bytes(ex, *_k4_search_ref(ex, xt, nmax=31, rmin=-0.5, nstep=15))


def _q5_k_impl(ex, xt, qw):
  return _q5_k_bytes(ex, *_k4_search_impl(ex, xt, qw, nmax=31, clamp=True))


# ---- Q6_K ----


def _q6_k(ex: Exact, xt, qw):
  """Q6_K: 16 signed 8-bit sub-block scales; the importance matrix (if any) weighs the search as is."""
  xs = _sub_blocks(xt, 16)
  w = ex.mul(xs, xs) if qw is None else _sub_blocks(qw, 16)
  scales, levels = make_qx_quants(ex, xs, w, nmax=32)
  max_abs, max_scale = signed_abs_max(scales)
  iscale = ex.div(np.float32(-128), max_scale)
  sc = _int8(jnp.minimum(127, ex.nearest_int(ex.mul(iscale[None], scales))))
  d = fp16_round(ex.div(np.float32(1), iscale))
  q = _super_blocks(_requantize(ex, xs, d[None] * sc, None, levels, lo=-32, hi=31, offset=32))
  parts = jnp.concatenate([*pack_q6_codes(q), sc, fp16_bytes(d)])
  return [jnp.where(max_abs[None] < GROUP_MAX_EPS, 0, parts)]  # an all-zero super-block is all zero bytes


def _per_chunk(encoder: Callable[..., ByteRows]) -> Callable[..., Array]:
  """A whole-tensor encoder ``(ex, *blocks, n) -> rows`` that runs `encoder` chunk by chunk."""
  return lambda ex, *blocks, n: encode_blocks(functools.partial(encoder, ex), blocks, n, chunk=SEARCH_CHUNK)


REFERENCE: dict[str, Callable[..., Array]] = {
  "Q2_K": _per_chunk(_q2_k_ref),
  "Q3_K": _q3_k_ref,
  "Q4_K": _per_chunk(_q4_k_ref),
  "Q5_K": _per_chunk(_q5_k_ref),
  "Q6_K": _per_chunk(lambda ex, xt: _q6_k(ex, xt, None)),
}
WEIGHTED: dict[str, Callable[..., Array]] = {
  "Q2_K": _per_chunk(_q2_k_impl),
  "Q3_K": _per_chunk(_q3_k_impl),
  "Q4_K": _per_chunk(_q4_k_impl),
  "Q5_K": _per_chunk(_q5_k_impl),
  "Q6_K": _per_chunk(_q6_k),
}


NON_LINEAR: dict[str, Callable[..., ByteRows]] = {
  "IQ4_NL": ggml_iq4.iq4_nl_bytes,
  "IQ4_XS": ggml_iq4.iq4_xs_bytes,
  "MXFP4": ggml_mxfp4.mxfp4_bytes,
}


def _encode_non_linear(ex: Exact, rows, imatrix, type_name: str):
  n, block = rows.shape[0], ggml.BLOCK_TYPES[type_name].block_size
  x = ggml_legacy.to_blocks(rows, block)
  encoder = functools.partial(NON_LINEAR[type_name], ex)
  if imatrix is None:
    return encode_blocks(encoder, (x,), n, chunk=SEARCH_CHUNK)
  return encode_blocks(encoder, (x, ggml_legacy.block_importance(imatrix, n, block)), n, chunk=SEARCH_CHUNK)


@functools.partial(jax.jit, static_argnames=("type_name",))
def _encode(rows: Float[Array, "n k"], imatrix: Float[Array, " k"] | None, *, type_name: str):
  ex = Exact.of(rows)
  if type_name in NON_LINEAR:
    return _encode_non_linear(ex, rows, imatrix, type_name)
  if ggml.BLOCK_TYPES[type_name].block_size != QK_K:
    return ggml_legacy.encode_rows(ex, rows, type_name, imatrix)
  n = rows.shape[0]
  xt = ggml_legacy.to_blocks(rows, QK_K)
  if imatrix is None:
    return REFERENCE[type_name](ex, xt, n=n)
  return WEIGHTED[type_name](ex, xt, ggml_legacy.block_importance(imatrix, n, QK_K), n=n)


def _check_finite(name: str, x: Array) -> None:
  """Raises on NaN or inf in a concrete array (under a trace the values are unknown and the check is skipped)."""
  if isinstance(x, jax.core.Tracer):
    return
  x = np.asarray(x)
  step = max(1, ROW_CHUNK_ELEMENTS // max(1, x[:1].size))  # row chunks: the masks of a whole embedding are a GB
  for start in range(0, len(x), step):
    bad = ~np.isfinite(x[start : start + step])
    if bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0] + np.eye(x.ndim, dtype=int)[0] * start)
      count = sum(int((~np.isfinite(x[i : i + step])).sum()) for i in range(0, len(x), step))
      raise ValueError(f"`encode` expected finite {name}, got {count} NaN/inf values (first at {first}).")


def encode(
  rows: Float[Array, "n k"], type_name: str, imatrix: Float[Array, " k"] | None = None
) -> UInt8[Array, "n row_bytes"]:
  """Quantizes rows into ggml blocks, byte for byte as llama.cpp's ``ggml_quantize_chunk``.

  Each row is a run of blocks along `k`. Without `imatrix` the bytes are those of ``quantize_row_<type>_ref``; with
  it, those of the importance-weighted ``quantize_row_<type>_impl`` (Q8_0 and MXFP4 have none and ignore it).

  Exactness: the bytes equal those of llama.cpp built without FMA contraction (as llama-cpp-python ships it) on
  XLA:CPU, for finite input whose 16- or 32-element sub-blocks have max ``|x|`` between about 1e-9 and 1e13.
  Below, XLA flushes subnormal sums of squares to zero where C keeps them; above, C's overflows reach different
  NaN orderings. Other backends are not checked.

  Args:
    rows: (n, k) float32 (other float dtypes are converted); `k` a multiple of the block size (32, or 256 for
      the k-quants).
    type_name: one of ``Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4``.
    imatrix: optional (k,) float32 importance of each column, as llama.cpp's imatrix tool yields it (the mean of
      ``x^2`` of the layer's inputs).

  Returns:
    (n, k / block_size * type_size) uint8: one row of blocks per input row, as stored in a GGUF file; a numpy
    array for numpy `rows`, else a jax array.

  Raises:
    ValueError: for an unknown type, a row length that is not whole blocks, an `imatrix` of the wrong shape, or
      NaN/inf in a concrete input.

  References:
    llama.cpp ``ggml/src/ggml-quants.c`` (``quantize_row_*_ref``, ``quantize_row_*_impl``, ``make_qx_quants``,
    ``make_q3_quants``, ``make_qkx2_quants``, ``make_qkx3_quants``, ``make_qp_quants``); checked byte for byte
    against llama-cpp-python 0.3.36's ``libggml-base``.

  Examples:
    >>> import numpy as np
    >>> rows = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    >>> encode(rows, "Q4_K").shape
    (4, 288)
  """
  info = ggml_decode.block_type(type_name, caller="encode")
  rows = rows if isinstance(rows, np.ndarray) else jnp.asarray(rows)  # numpy goes to the device a chunk at a time
  if rows.ndim != 2 or rows.shape[1] % info.block_size:
    raise ValueError(
      f"`encode` expected rows (n, k) with k a multiple of the {type_name} block size {info.block_size}, "
      f"got {rows.shape=}."
    )
  _check_finite("rows", rows)
  if imatrix is not None:
    imatrix = jnp.asarray(imatrix, jnp.float32)
    if imatrix.shape != rows.shape[1:]:
      raise ValueError(f"`encode` expected imatrix of shape {rows.shape[1:]}, got {imatrix.shape=}.")
    _check_finite("imatrix", imatrix)
  step = max(1, ROW_CHUNK_ELEMENTS // rows.shape[1])
  if isinstance(rows, np.ndarray):
    # Host rows give host bytes, filled in a chunk at a time: a list of device chunks and their concatenation would
    # hold the result twice (0.4 GB each for a Q6_K head of Llama 3's vocabulary).
    out = np.empty((rows.shape[0], rows.shape[1] // info.block_size * info.type_size), np.uint8)
    for i in range(0, rows.shape[0], step):
      out[i : i + step] = _encode(jnp.asarray(rows[i : i + step], jnp.float32), imatrix, type_name=type_name)
    return out
  chunks = []
  for i in range(0, rows.shape[0], step):
    chunk = _encode(jnp.asarray(rows[i : i + step], jnp.float32), imatrix, type_name=type_name)
    # Each concrete chunk is waited for: dispatched ahead, every chunk's input would stay alive until its turn came.
    chunks.append(chunk if isinstance(chunk, jax.core.Tracer) else chunk.block_until_ready())
  return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
