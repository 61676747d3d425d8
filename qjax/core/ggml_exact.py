"""C-order float32 arithmetic on XLA:CPU, and llama.cpp's scale searches vectorized over blocks.

llama.cpp's quantizers (`ggml-quants.c`) are plain IEEE float32 arithmetic: each operation rounded on its own and
sums taken in loop order. XLA:CPU changes the bytes in four ways (the first three measured in
`kquants-exactness.md`): it contracts ``a*b + c`` into an FMA, rewrites ``x / broadcast(d)`` and ``x / constant``
as multiplication by a reciprocal, reduces in tree order, and flushes subnormal results to zero. `Exact` undoes
them: it hides every product and divisor behind an integer OR with a zero that XLA cannot see, sums element by
element, and compares the products that go subnormal first (in make_q3_quants and make_qx_quants, for sub-blocks
of magnitude about 1e-6 and 1e-7) as C rounds them. Sub-blocks entirely below about 1e-9, whose sums of squares
are subnormal, are not covered.

Array convention: the elements of a (sub-)block run along axis 0 and the trailing axes index the (sub-)blocks, so
one step of a C loop over the elements is one vector operation over all blocks.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer in the low mantissa bits
GROUP_MAX_EPS = np.float32(1e-15)  # llama.cpp treats a group with max |x| below this as all zero
_PASSES = 5  # coordinate-descent passes of make_q3_quants and make_qp_quants
_MIN_NORMAL = np.float32(2.0**-126)
_TWO_64 = np.float32(2.0**64)
_SCALED_MIN_NORMAL = np.float32(2.0**-62)  # 2**-126 * 2**64
_SCALED_QUANTUM = np.float32(2.0**-85)  # the subnormal spacing 2**-149, times 2**64


def _bits(x: Array) -> Array:
  return lax.bitcast_convert_type(x, jnp.int32)


def _float(i: Array) -> Array:
  return lax.bitcast_convert_type(i, jnp.float32)


class Exact(NamedTuple):
  """float32 operations rounded as C rounds them, under XLA's optimizer.

  Attributes:
    zero: int32 scalar 0 computed at run time from the input. XLA can neither fold it (it comes out of a
      reduction over ``|x| * 0``, which float semantics forbid simplifying) nor look through it inside a fused
      loop, so ``bits(v) | zero`` is an identity that blocks FMA contraction and divisor rewrites.
  """

  zero: Int[Array, ""]

  @classmethod
  def of(cls, x: Array) -> "Exact":
    """An `Exact` whose zero derives from `x` (0 whenever x's first entries are finite)."""
    probe = jnp.sum(jnp.abs(x.reshape(-1)[:8].astype(jnp.float32)) * 0.0)
    return cls(_bits(probe))

  def hide(self, x: Array) -> Array:
    """`x` unchanged, opaque to the compiler."""
    return _float(_bits(x) | self.zero)

  def mul(self, a, b) -> Array:
    """``a * b`` rounded to float32 before any add that follows (no FMA)."""
    return self.hide(jnp.multiply(a, b))

  def div(self, a, b) -> Array:
    """IEEE ``a / b``: the divisor mixes in bits of `a` (times zero) so it is never a broadcast or a constant."""
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    # The quotient is hidden too, so that no later division folds into this one ((a/b)/c -> a/(b*c)).
    return self.hide(a / _float(_bits(b) | (_bits(a) & self.zero)))

  def csum(self, terms: Float[Array, "n ..."], *, from_zero: bool = True) -> Float[Array, "..."]:
    """``s = 0; for i: s += terms[i]`` (or ``s = terms[0]; ...`` without `from_zero`), over a short axis 0."""
    acc = self.hide(jnp.zeros(terms.shape[1:], jnp.float32)) + terms[0] if from_zero else terms[0]
    for i in range(1, terms.shape[0]):
      acc = acc + terms[i]
    return acc

  def csum_chunks(self, terms: Float[Array, "chunks n ..."]) -> Float[Array, "..."]:
    """``s = 0; for c: for i: s += terms[c, i]``: a C-order sum over a long run, scanned chunk by chunk."""

    def add_chunk(acc, chunk):
      for i in range(chunk.shape[0]):
        acc = acc + chunk[i]
      return acc, None

    acc, _ = lax.scan(add_chunk, self.hide(jnp.zeros(terms.shape[2:], jnp.float32)), terms)
    return acc

  def greater_product(self, a, b, c, d) -> Array:
    """C's ``a*b > c*d``, also where a product is subnormal in C, which XLA:CPU flushes to zero.

    When both products are below the smallest normal (2**-126) they are compared as C rounds them, to multiples
    of 2**-149, computed 2**64 times larger where they are normal. (Their factors must be normal.)
    """
    p, q = self.mul(a, b), self.mul(c, d)
    tiny = (jnp.abs(p) < _MIN_NORMAL) & (jnp.abs(q) < _MIN_NORMAL)
    return jnp.where(tiny, self._subnormal_product(a, b) > self._subnormal_product(c, d), p > q)

  def _subnormal_product(self, a, b) -> Array:
    """``2**64 * round(a*b)`` with C's rounding to a multiple of 2**-149, for ``|a*b| < 2**-126``."""
    a = self.mul(a, _TWO_64)  # exact
    hi = self.mul(a, b)
    # Dekker's exact product: hi + lo == a*b, from 12-bit halves whose products are exact.
    (ah, al), (bh, bl) = self._halves(a), self._halves(b)
    err = self.hide(self.hide(hi - self.mul(ah, bh)) - self.mul(al, bh)) - self.mul(ah, bl)
    lo = self.mul(al, bl) - err
    # hi + 2**-62 (scaled 2**-126) lies in the binade whose spacing is the scaled subnormal quantum.
    shift = jnp.where(hi < 0, -_SCALED_MIN_NORMAL, _SCALED_MIN_NORMAL)
    r = self.hide(self.hide(hi + shift) - shift)
    # hi rounded at a tie that the exact product is past: round the other way.
    t = hi - r
    up = (t == _SCALED_QUANTUM / 2) & (lo > 0)
    down = (t == -_SCALED_QUANTUM / 2) & (lo < 0)
    return r + jnp.where(up, _SCALED_QUANTUM, jnp.where(down, -_SCALED_QUANTUM, np.float32(0)))

  def _halves(self, x) -> tuple[Array, Array]:
    """Veltkamp's split of `x` into a 12-bit high part and the exact rest."""
    t = self.mul(x, np.float32(4097))
    high = t - self.hide(t - x)
    return high, x - high

  def nearest_int(self, x: Float[Array, "..."]) -> Int[Array, "..."]:
    """llama.cpp's ``nearest_int``: round half to even through the 1.5 * 2**23 mantissa trick (|x| < 2**22)."""
    return (_bits(x + _MAGIC) & 0x007FFFFF) - 0x00400000


def _first_where(mask: Array, x: Array) -> Array:
  """``x[i]`` at the first ``i`` (along axis 0) where `mask` holds; `mask` holds somewhere in every column."""
  first = jnp.argmax(mask, axis=0)
  return jnp.take_along_axis(x, first[None], axis=0)[0]


def running_extreme(x: Float[Array, "n ..."], *, larger: bool) -> Float[Array, "..."]:
  """``m = x[0]; for i: if (x[i] > m) m = x[i]`` (``<`` for the minimum): the first of equal extremes, so that
  -0 and +0 come out as in C."""
  m = jnp.max(x, axis=0) if larger else jnp.min(x, axis=0)
  return _first_where(x == m[None], x)


def signed_abs_max(x: Float[Array, "n ..."]) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
  """``amax = 0; max = 0; for i: if (|x[i]| > amax) {amax = |x[i]|; max = x[i];}``: (amax, max)."""
  amax = jnp.max(jnp.abs(x), axis=0)
  return amax, jnp.where(amax > 0, _first_where(jnp.abs(x) == amax[None], x), 0.0)


def make_qx_quants(
  ex: Exact, x: Float[Array, "n ..."], w: Float[Array, "n ..."], *, nmax: int
) -> tuple[Float[Array, "..."], Int[Array, "n ..."]]:
  """Symmetric scale by weighted least squares over 19 trial grids (``make_qx_quants``, ``rmse_type = 1``).

  Minimises ``sum_i w_i (x_i - s l_i)^2`` over ``l_i`` in ``[-nmax, nmax)``: each trial ``iscale = -(nmax + 0.1
  t) / max`` (t in -9..9) rounds ``l`` and solves ``s = sum w x l / sum w l^2``; the best ``(sum w x l)^2 / sum w
  l^2`` wins.

  Args:
    ex: exact arithmetic.
    x: (n, ...) float32 values, n elements per group.
    w: (n, ...) float32 weights (``x*x``, or the importance matrix).
    nmax: half the number of levels.

  Returns:
    scale: (...) float32; levels: (n, ...) int32 in ``[0, 2 nmax)`` (``l + nmax``), all 0 for a zero group.
  """
  amax, mx = signed_abs_max(x)
  wx = ex.mul(w, x)

  def levels(iscale):
    return jnp.clip(ex.nearest_int(ex.mul(iscale[None], x)), -nmax, nmax - 1)

  def sums(iscale):
    lf = levels(iscale).astype(jnp.float32)
    return ex.csum(ex.mul(wx, lf)), ex.csum(ex.mul(ex.mul(w, lf), lf))

  iscale = ex.div(np.float32(-nmax), mx)
  sumlx, suml2 = sums(iscale)
  scale = jnp.where(suml2 != 0, ex.div(sumlx, suml2), 0.0)
  best = ex.mul(scale, sumlx)

  def trial(carry, numerator):
    scale, best, best_iscale = carry
    iscale = ex.div(numerator, mx)
    sumlx, suml2 = sums(iscale)
    better = (suml2 > 0) & ex.greater_product(sumlx, sumlx, best, suml2)
    new_scale = ex.div(sumlx, suml2)
    return (
      jnp.where(better, new_scale, scale),
      jnp.where(better, ex.mul(new_scale, sumlx), best),
      jnp.where(better, iscale, best_iscale),
    ), None

  # llama.cpp forms `-(nmax + 0.1f*is)` in float32; numpy rounds each step the same way.
  numerators = np.array([-(np.float32(nmax) + np.float32(0.1) * np.float32(t)) for t in range(-9, 10) if t], np.float32)
  (scale, _, iscale), _ = lax.scan(trial, (scale, best, iscale), numerators)
  empty = amax < GROUP_MAX_EPS
  return jnp.where(empty, 0.0, scale), jnp.where(empty[None], 0, levels(iscale) + nmax)


class Descent(NamedTuple):
  """State of the coordinate descent of make_q3_quants / make_qp_quants (see `descend`).

  Attributes:
    levels: (n, ...) int32 levels, as C stores them.
    sumlx: (...) float32 ``sum w x l``.
    suml2: (...) float32 ``sum w l^2``.
    start: (...) int32 next element to try in the current pass.
    passes: (...) int32 passes completed; `_PASSES` once the group is done.
    changed: (...) bool, whether the current pass has moved an element.
  """

  levels: Int[Array, "n ..."]
  sumlx: Float[Array, "..."]
  suml2: Float[Array, "..."]
  start: Int[Array, "..."]
  passes: Int[Array, "..."]
  changed: Bool[Array, "..."]

  @classmethod
  def begin(cls, levels: Array, sumlx: Array, suml2: Array) -> "Descent":
    zeros = jnp.zeros(sumlx.shape, jnp.int32)
    return cls(levels, sumlx, suml2, zeros, zeros, zeros.astype(bool))


def _move(ex: Exact, x, w, wx, level, sumlx, suml2, *, lo: int | None, hi: int, need_positive_sl2: bool):
  """An element's best level given the others, ``nearest_int(x * sl2 / slx)``, and whether C accepts it.

  Returns (accept, new level, new sumlx, new suml2); works on one element or on all at once.
  """
  li = level.astype(jnp.float32)
  slx = sumlx - ex.mul(wx, li)
  sl2 = suml2 - ex.mul(ex.mul(w, li), li)
  cand = jnp.minimum(ex.nearest_int(ex.div(ex.mul(x, sl2), slx)), hi)
  if lo is not None:
    cand = jnp.maximum(cand, lo)
  cf = cand.astype(jnp.float32)
  new_slx = slx + ex.mul(wx, cf)
  new_sl2 = sl2 + ex.mul(ex.mul(w, cf), cf)
  ok = (slx > 0) & (cand != level) & ((sl2 > 0) if need_positive_sl2 else (new_sl2 > 0))
  ok &= ex.greater_product(ex.mul(new_slx, new_slx), suml2, ex.mul(sumlx, sumlx), new_sl2)
  return ok, cand, new_slx, new_sl2


def _round(ex: Exact, data, st: Descent, *, store, **move) -> Descent:
  """One round: every element tries its move against the current sums; the first acceptable one is applied.

  The first index and the values there come from select chains over the n rows (elementwise along the groups,
  where an argmax and a gather along axis 0 would be strided), and the chosen move is recomputed on its own
  rather than taken from the all-element evaluation, which XLA would otherwise recompute in every consumer.
  """
  x, w = data
  n = x.shape[0]
  ok, *_ = _move(ex, x, w, ex.mul(w, x), st.levels, st.sumlx[None], st.suml2[None], **move)
  active = st.passes < _PASSES
  first = jnp.full(st.start.shape, n)
  for i in reversed(range(n)):
    first = jnp.where(ok[i] & (i >= st.start) & active, i, first)
  found = first < n

  def at_first(v):
    out = v[0]
    for i in range(1, n):
      out = jnp.where(first == i, v[i], out)
    return out

  xf, wf = at_first(x), at_first(w)
  _, cand, new_slx, new_sl2 = _move(ex, xf, wf, ex.mul(wf, xf), at_first(st.levels), st.sumlx, st.suml2, **move)
  index = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  # No move left: the pass ends, and another starts only if this one changed something.
  return Descent(
    levels=jnp.where(index == first[None], store(cand)[None], st.levels),
    sumlx=jnp.where(found, new_slx, st.sumlx),
    suml2=jnp.where(found, new_sl2, st.suml2),
    start=jnp.where(found, first + 1, 0),
    passes=jnp.where(found | ~active, st.passes, jnp.where(st.changed, st.passes + 1, _PASSES)),
    changed=found,
  )


def _take(v: Array, idx: Array) -> Array:
  """Groups `idx` of `v` (groups last)."""
  return jnp.take(v, idx, axis=-1, mode="clip")


def _solve(step, data, st: Descent, caps: tuple[int, ...]) -> Descent:
  """Runs rounds until at most ``caps[0]`` groups are active, then solves those in a buffer of that size.

  The number of rounds is set by the slowest group, but most groups finish in the first (no move in their first
  pass), so the stragglers are gathered into ever smaller buffers and the work follows the mean, not the max.
  Results come back by a gather from the buffer (a scatter into the full arrays costs several times more).
  """
  limit = caps[0] if caps else 0
  st = lax.while_loop(lambda s: jnp.sum(s.passes < _PASSES) > limit, lambda s: step(data, s), st)
  if not caps:
    return st
  active = st.passes < _PASSES
  idx = jnp.nonzero(active, size=caps[0], fill_value=active.shape[0])[0]
  sub = Descent(*(_take(v, idx) for v in st))
  sub = sub._replace(passes=jnp.where(idx < active.shape[0], sub.passes, _PASSES))  # padding entries are done
  sub = _solve(step, tuple(_take(v, idx) for v in data), sub, caps[1:])
  slot = jnp.cumsum(active) - 1  # where each active group sits in the buffer
  return Descent(*(jnp.where(active, _take(u, slot), v) for v, u in zip(st, sub, strict=True)))


def descend(
  ex: Exact,
  x: Float[Array, "n ..."],
  w: Float[Array, "n ..."],
  st: Descent,
  *,
  lo: int | None,
  hi: int,
  store: Callable[[Array], Array],
  need_positive_sl2: bool,
  rounds: int | None = None,
) -> Descent:
  """Coordinate descent of make_q3_quants / make_qp_quants, exactly as C runs it, in vectorized rounds.

  C visits the elements in order, for up to 5 passes, stopping after a pass that changes nothing; element ``i``
  moves to ``nearest_int(x_i * sl2 / slx)`` (its optimum given the others) when that raises
  ``sumlx^2 / suml2``. Between two accepted moves the sums are fixed, so every element up to the next accepted one
  sees the same sums: each round tries all elements at once, applies the first acceptable move at or after the
  pass's position, and resumes after it; a round with no move ends the pass. A group costs (moves + passes)
  vector steps instead of 5 * n sequential ones.

  Args:
    ex: exact arithmetic.
    x, w: (n, ...) float32 values and weights.
    st: where the descent stands (`Descent.begin` to start).
    lo, hi: clamp bounds of a new level (`lo` None: no lower bound).
    store: maps a new level to C's storage type (uint8 for make_qp_quants).
    need_positive_sl2: make_qp_quants requires ``sl2 > 0`` before trying; make_q3_quants checks it after.
    rounds: run this many rounds; None runs to the end, gathering the groups still active into ever smaller
      buffers (`_solve`) so that the work follows the mean number of rounds, not the slowest group's.
  """
  step = functools.partial(_round, ex, store=store, lo=lo, hi=hi, need_positive_sl2=need_positive_sl2)
  if rounds is not None:
    return lax.fori_loop(0, rounds, lambda _, s: step((x, w), s), st)
  n, shape = x.shape[0], x.shape[1:]
  data = (x.reshape(n, -1), w.reshape(n, -1))
  groups = data[0].shape[1]
  # The first round leaves about a fifth of the groups active on real and random data (and up to 5 + n rounds
  # for the slowest): a quarter, then a 64th of the groups, measured best of ladders 1 to 4 deep.
  caps = tuple(cap for cap in (groups // 4, groups // 64) if cap >= 64)
  st = _solve(step, data, Descent(st.levels.reshape(n, -1), *(v.reshape(-1) for v in st[1:])), caps)
  return Descent(st.levels.reshape(x.shape), *(v.reshape(shape) for v in st[1:]))


def q3_start(ex: Exact, x: Float[Array, "n ..."], *, nmax: int) -> Descent:
  """make_q3_quants (Q3_K without an importance matrix) up to its coordinate descent, plus the descent's first
  round: round on ``iscale = -nmax / max`` with weights ``w = x^2``.

  Q3_K finishes the descent (`q3_descend`) over all sub-blocks of a tensor at once, then `q3_result`.
  """
  _, mx = signed_abs_max(x)
  w = ex.mul(x, x)
  levels = jnp.clip(ex.nearest_int(ex.mul(ex.div(np.float32(-nmax), mx)[None], x)), -nmax, nmax - 1)
  lf = levels.astype(jnp.float32)
  st = Descent.begin(levels, ex.csum(ex.mul(ex.mul(w, x), lf)), ex.csum(ex.mul(ex.mul(w, lf), lf)))
  return q3_descend(ex, x, st, nmax=nmax, rounds=1)


def q3_descend(ex: Exact, x: Float[Array, "n ..."], st: Descent, *, nmax: int, rounds: int | None = None) -> Descent:
  """The coordinate descent of make_q3_quants (see `descend`)."""
  return descend(
    ex, x, ex.mul(x, x), st, lo=-nmax, hi=nmax - 1, store=lambda v: v, need_positive_sl2=False, rounds=rounds
  )


def q3_result(ex: Exact, x: Float[Array, "n ..."], st: Descent, *, nmax: int) -> tuple[Array, Array]:
  """make_q3_quants' result: scale (...) float32 ``sum w x l / sum w l^2`` and levels (n, ...) int32 in
  ``[0, 2 nmax)``, both 0 for a zero group."""
  amax, _ = signed_abs_max(x)
  empty = amax < GROUP_MAX_EPS
  scale = jnp.where(st.suml2 > 0, ex.div(st.sumlx, st.suml2), 0.0)
  return jnp.where(empty, 0.0, scale), jnp.where(empty[None], 0, st.levels + nmax)


def make_qp_quants(
  ex: Exact, x: Float[Array, "n ..."], w: Float[Array, "n ..."], *, nmax: int
) -> tuple[Float[Array, "..."], Int[Array, "n ..."]]:
  """Positive scale for the sub-block scales of a super-block (``make_qp_quants``), with an importance matrix.

  Picks ``iscale = (nmax + 0.1 t) / max`` (t in -4..4) with the least ``sum w (x - l / iscale)^2``, then improves
  by `descend`. Levels are stored as C's ``uint8_t`` (so a negative level wraps), as llama.cpp reads them back.

  Returns:
    scale: (...) float32; levels: (n, ...) int32 in ``[0, 256)``, 0 for a zero group.
  """
  # C's `max = MAX(max, x[i])` from 0; a max <= 0 (whatever the sign of zero) makes the group empty below.
  mx = jnp.maximum(jnp.max(x, axis=0), 0.0)
  wx = ex.mul(w, x)

  def mse(iscale, levels):
    diff = x - ex.mul(ex.div(np.float32(1.0), iscale)[None], levels.astype(jnp.float32))
    return ex.csum(ex.mul(ex.mul(w, diff), diff))

  iscale = ex.div(np.float32(nmax), mx)
  best = mse(iscale, ex.nearest_int(ex.mul(iscale[None], x)) & 0xFF)

  def trial(carry, numerator):
    best, best_iscale = carry
    iscale = ex.div(numerator, mx)
    err = mse(iscale, jnp.minimum(nmax, ex.nearest_int(ex.mul(iscale[None], x))))
    better = err < best
    return (jnp.where(better, err, best), jnp.where(better, iscale, best_iscale)), None

  numerators = np.array([np.float32(0.1) * np.float32(t) + np.float32(nmax) for t in range(-4, 5) if t], np.float32)
  (_, iscale), _ = lax.scan(trial, (best, iscale), numerators)
  levels = jnp.minimum(nmax, ex.nearest_int(ex.mul(iscale[None], x)))
  lf = levels.astype(jnp.float32)
  sumlx = ex.csum(ex.mul(wx, lf))
  suml2 = ex.csum(ex.mul(ex.mul(w, lf), lf))
  st = descend(
    ex,
    x,
    w,
    Descent.begin(levels & 0xFF, sumlx, suml2),
    lo=None,
    hi=nmax,
    store=lambda v: v & 0xFF,
    need_positive_sl2=True,
  )
  scale = jnp.where(st.suml2 > 0, ex.div(st.sumlx, st.suml2), 0.0)
  empty = mx < GROUP_MAX_EPS
  return jnp.where(empty, 0.0, scale), jnp.where(empty[None], 0, st.levels)


def make_qkx_quants(
  ex: Exact,
  x: Float[Array, "n ..."],
  w: Float[Array, "n ..."],
  *,
  nmax: int,
  rmin: float,
  rdelta: float,
  nstep: int,
  use_mad: bool,
) -> tuple[Float[Array, "..."], Float[Array, "..."], Int[Array, "n ..."]]:
  """Asymmetric scale and min, ``x ~ scale * l - the_min`` (``make_qkx2_quants`` and ``make_qkx3_quants``).

  Minimises ``sum_i w_i |x_i - (s l_i + m)|^p`` (p = 1 with `use_mad`, else 2) with ``m <= 0``: starting from the
  range grid, each of ``nstep + 1`` trials ``iscale = (nmax + rmin + rdelta t) / (max - m)`` rounds the levels and
  solves the 2x2 weighted least squares for ``(s, m)``. As in C, an accepted trial's ``m`` shifts the grid of the
  trials after it, so the trials run in sequence. (qkx3 differs from qkx2 only in testing ``max <= min`` for an
  empty range, which after ``min = min(min, 0)`` is the same as ``max == min``.)

  Args:
    ex: exact arithmetic.
    x: (n, ...) float32 values.
    w: (n, ...) float32 non-negative weights.
    nmax: highest level.
    rmin, rdelta, nstep: the trial grid.
    use_mad: weigh absolute instead of squared errors.

  Returns:
    scale: (...) float32; the_min: (...) float32 ``-m >= 0``; levels: (n, ...) int32 in ``[0, nmax]``.
  """
  mn = running_extreme(x, larger=False)
  mn = jnp.where(mn > 0, 0.0, mn)
  mx = running_extreme(x, larger=True)
  sum_w = ex.csum(w, from_zero=False)
  sum_x = ex.csum(ex.mul(w, x), from_zero=False)

  def levels(iscale, m):
    return jnp.clip(ex.nearest_int(ex.mul(iscale[None], x - m[None])), 0, nmax)

  def error(scale, m, lf):
    diff = ex.mul(scale[None], lf) + m[None] - x
    diff = jnp.abs(diff) if use_mad else ex.mul(diff, diff)
    return ex.csum(ex.mul(w, diff))

  iscale = ex.div(np.float32(nmax), mx - mn)
  scale = ex.div(np.float32(1.0), iscale)
  best = error(scale, mn, levels(iscale, mn).astype(jnp.float32))

  def trial(carry, numerator):
    best, scale, m, level_iscale, level_min = carry
    iscale = ex.div(numerator, mx - m)
    lf = levels(iscale, m).astype(jnp.float32)
    wl = ex.mul(w, lf)
    sum_l, sum_l2, sum_xl = ex.csum(wl), ex.csum(ex.mul(wl, lf)), ex.csum(ex.mul(wl, x))
    det = ex.mul(sum_w, sum_l2) - ex.mul(sum_l, sum_l)
    this_scale = ex.div(ex.mul(sum_w, sum_xl) - ex.mul(sum_x, sum_l), det)
    this_min = ex.div(ex.mul(sum_l2, sum_x) - ex.mul(sum_l, sum_xl), det)
    clamp = this_min > 0
    this_scale = jnp.where(clamp, ex.div(sum_xl, sum_l2), this_scale)
    this_min = jnp.where(clamp, 0.0, this_min)
    err = error(this_scale, this_min, lf)
    better = (det > 0) & (err < best)
    # Rather than carrying the levels, keep the (iscale, min) that produced them and round once at the end.
    return (
      jnp.where(better, err, best),
      jnp.where(better, this_scale, scale),
      jnp.where(better, this_min, m),
      jnp.where(better, iscale, level_iscale),
      jnp.where(better, m, level_min),
    ), None

  # llama.cpp forms `rmin + rdelta*is + nmax` in float32; numpy rounds each step the same way.
  numerators = np.array(
    [np.float32(rmin) + np.float32(rdelta) * np.float32(t) + np.float32(nmax) for t in range(nstep + 1)], np.float32
  )
  (_, scale, m, level_iscale, level_min), _ = lax.scan(trial, (best, scale, mn, iscale, mn), numerators)
  empty = mx == mn
  return (
    jnp.where(empty, 0.0, scale),
    -jnp.where(empty, mn, m),
    jnp.where(empty[None], 0, levels(level_iscale, level_min)),
  )
