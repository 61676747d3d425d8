"""C-order float32 arithmetic on XLA:CPU, and llama.cpp's scale searches vectorized over blocks.

llama.cpp's quantizers (`ggml-quants.c`) are plain IEEE float32 arithmetic: each operation rounded on its own and
sums taken in loop order. XLA:CPU changes the bytes in three ways (measured in `kquants-exactness.md`): it contracts
``a*b + c`` into an FMA, rewrites ``x / broadcast(d)`` and ``x / constant`` as multiplication by a reciprocal, and
reduces in tree order. `Exact` undoes each: it hides every product and divisor behind an integer OR with a zero that
XLA cannot see, and sums element by element.

Array convention: the elements of a (sub-)block run along axis 0 and the trailing axes index the (sub-)blocks, so
one step of a C loop over the elements is one vector operation over all blocks.
"""

import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer in the low mantissa bits
GROUP_MAX_EPS = np.float32(1e-15)  # llama.cpp treats a group with max |x| below this as all zero
_PASSES = 5  # coordinate-descent passes of make_q3_quants and make_qp_quants


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

  def nearest_int(self, x: Float[Array, "..."]) -> Int[Array, "..."]:
    """llama.cpp's ``nearest_int``: round half to even through the 1.5 * 2**23 mantissa trick (|x| < 2**22)."""
    return (_bits(x + _MAGIC) & 0x007FFFFF) - 0x00400000


def _first_where(mask: Array, x: Array) -> Array:
  """``x[i]`` at the first ``i`` (along axis 0) where `mask` holds; `mask` holds somewhere in every column."""
  first = jnp.argmax(mask, axis=0)
  return jnp.take_along_axis(x, first[None], axis=0)[0]


def running_extreme(x: Float[Array, "n ..."], *, larger: bool) -> Float[Array, "..."]:
  """``m = x[0]; for i: if (x[i] > m) m = x[i]`` (``<`` unless `larger`): the first of equal extremes, so that
  -0 and +0 come out as in C."""
  m = jnp.max(x, axis=0) if larger else jnp.min(x, axis=0)
  return _first_where(x == m, x)


def signed_abs_max(x: Float[Array, "n ..."]) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
  """``amax = 0; max = 0; for i: if (|x[i]| > amax) {amax = |x[i]|; max = x[i];}``: (amax, max)."""
  amax = jnp.max(jnp.abs(x), axis=0)
  return amax, jnp.where(amax > 0, _first_where(jnp.abs(x) == amax, x), 0.0)


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
    return jnp.clip(ex.nearest_int(ex.mul(iscale, x)), -nmax, nmax - 1)

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
    better = (suml2 > 0) & (ex.mul(sumlx, sumlx) > ex.mul(best, suml2))
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
  return jnp.where(empty, 0.0, scale), jnp.where(empty, 0, levels(iscale) + nmax)


class Descent(NamedTuple):
  """Levels and sums of make_q3_quants / make_qp_quants around their coordinate descent.

  Attributes:
    levels: (n, ...) int32, as C stores them.
    sumlx: (...) float32 ``sum w x l``.
    suml2: (...) float32 ``sum w l^2``.
  """

  levels: Int[Array, "n ..."]
  sumlx: Float[Array, "..."]
  suml2: Float[Array, "..."]


class _Rounds(NamedTuple):
  """`Descent` plus where each group is: next element of its pass, passes done, and a change in this pass."""

  levels: Array
  sumlx: Array
  suml2: Array
  start: Array
  passes: Array
  changed: Array


def _round(ex: Exact, data, st: _Rounds, *, lo: int | None, hi: int, store, need_positive_sl2: bool) -> _Rounds:
  """One round: every element tries its move against the current sums; the first acceptable one is applied."""
  x, w, wx = data
  li = st.levels.astype(jnp.float32)
  slx = st.sumlx - ex.mul(wx, li)
  sl2 = st.suml2 - ex.mul(ex.mul(w, li), li)
  cand = jnp.minimum(ex.nearest_int(ex.div(ex.mul(x, sl2), slx)), hi)
  if lo is not None:
    cand = jnp.maximum(cand, lo)
  cf = cand.astype(jnp.float32)
  new_slx = slx + ex.mul(wx, cf)
  new_sl2 = sl2 + ex.mul(ex.mul(w, cf), cf)
  ok = (slx > 0) & (cand != st.levels) & ((sl2 > 0) if need_positive_sl2 else (new_sl2 > 0))
  ok &= ex.mul(ex.mul(new_slx, new_slx), st.suml2) > ex.mul(ex.mul(st.sumlx, st.sumlx), new_sl2)
  index = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  ok &= (index >= st.start) & (st.passes < _PASSES)
  first = jnp.argmax(ok, axis=0)
  found = jnp.any(ok, axis=0)

  def at_first(v):
    return jnp.take_along_axis(v, first[None], axis=0)[0]

  # No move left: the pass ends, and another starts only if this one changed something.
  return _Rounds(
    levels=jnp.where(found & (index == first), store(cand), st.levels),
    sumlx=jnp.where(found, at_first(new_slx), st.sumlx),
    suml2=jnp.where(found, at_first(new_sl2), st.suml2),
    start=jnp.where(found, first + 1, 0),
    passes=jnp.where(found, st.passes, jnp.where(st.changed, st.passes + 1, _PASSES)),
    changed=found,
  )


def _solve(step, data, st: _Rounds, caps: tuple[int, ...]) -> _Rounds:
  """Runs rounds until at most ``caps[0]`` groups are active, then solves those in a buffer of that size.

  The number of rounds is set by the slowest group, but most groups finish in the first (no move in their first
  pass), so the stragglers are gathered into ever smaller buffers and the work follows the mean, not the max.
  """
  limit = caps[0] if caps else 0
  st = lax.while_loop(lambda s: jnp.sum(s.passes < _PASSES) > limit, lambda s: step(data, s), st)
  if not caps:
    return st
  groups = st.passes.shape[0]
  idx = jnp.nonzero(st.passes < _PASSES, size=caps[0], fill_value=groups)[0]

  def gather(v):
    return jnp.take(v, idx, axis=-1, mode="clip")

  sub = _Rounds(*(gather(v) for v in st))
  sub = sub._replace(passes=jnp.where(idx < groups, sub.passes, _PASSES))  # padding entries are done
  sub = _solve(step, tuple(gather(v) for v in data), sub, caps[1:])
  return _Rounds(*(v.at[..., idx].set(u, mode="drop") for v, u in zip(st, sub, strict=True)))


def _descend(ex: Exact, x, w, start: Descent, *, lo: int | None, hi: int, store, need_positive_sl2: bool) -> Descent:
  """Coordinate descent of make_q3_quants / make_qp_quants, exactly as C runs it, in vectorized rounds.

  C visits the elements in order, for up to 5 passes, stopping after a pass that changes nothing; element ``i``
  moves to ``nearest_int(x_i * sl2 / slx)`` (its optimum given the others) when that raises
  ``sumlx^2 / suml2``. Between two accepted moves the sums are fixed, so every element up to the next accepted one
  sees the same sums: each round tries all elements at once, applies the first acceptable move at or after the
  pass's position, and resumes after it; a round with no move ends the pass. A group costs (moves + passes) vector
  steps instead of 5 * n sequential ones, and `_solve` keeps finished groups out of the later rounds.

  Args:
    x, w: (n, ...) float32 values and weights.
    start: the levels (as C stores them: `store` maps an int to that storage) and their sums.
    lo, hi: clamp bounds of a new level (`lo` None: no lower bound).
    need_positive_sl2: make_qp_quants requires ``sl2 > 0`` before trying; make_q3_quants checks it after.
  """
  n, groups_shape = x.shape[0], x.shape[1:]
  data = tuple(v.reshape(n, -1) for v in (x, w, ex.mul(w, x)))
  groups = data[0].shape[1]
  zeros = jnp.zeros((groups,), jnp.int32)
  st = _Rounds(
    start.levels.reshape(n, -1), start.sumlx.reshape(-1), start.suml2.reshape(-1), zeros, zeros, zeros.astype(bool)
  )
  caps = tuple(groups // 4**i for i in range(1, 8) if groups // 4**i >= 64)
  step = functools.partial(_round, ex, lo=lo, hi=hi, store=store, need_positive_sl2=need_positive_sl2)
  st = _solve(step, data, st, caps)
  return Descent(st.levels.reshape(x.shape), st.sumlx.reshape(groups_shape), st.suml2.reshape(groups_shape))


def q3_start(ex: Exact, x: Float[Array, "n ..."], *, nmax: int) -> Descent:
  """First half of make_q3_quants (Q3_K without an importance matrix): round on ``iscale = -nmax / max``.

  Its second half is `q3_descend` (weighted by ``w = x^2``) and `q3_result`; Q3_K runs the descent over all
  sub-blocks of a tensor at once, so the three are separate.
  """
  _, mx = signed_abs_max(x)
  w = ex.mul(x, x)
  levels = jnp.clip(ex.nearest_int(ex.mul(ex.div(np.float32(-nmax), mx), x)), -nmax, nmax - 1)
  lf = levels.astype(jnp.float32)
  return Descent(levels, ex.csum(ex.mul(ex.mul(w, x), lf)), ex.csum(ex.mul(ex.mul(w, lf), lf)))


def q3_descend(ex: Exact, x: Float[Array, "n ..."], start: Descent, *, nmax: int) -> Descent:
  """The coordinate descent of make_q3_quants."""
  return _descend(ex, x, ex.mul(x, x), start, lo=-nmax, hi=nmax - 1, store=lambda v: v, need_positive_sl2=False)


def q3_result(x: Float[Array, "n ..."], state: Descent, ex: Exact, *, nmax: int):
  """make_q3_quants' result: scale (...) float32 ``sum w x l / sum w l^2`` and levels (n, ...) int32 in
  ``[0, 2 nmax)``, both 0 for a zero group."""
  amax, _ = signed_abs_max(x)
  empty = amax < GROUP_MAX_EPS
  scale = jnp.where(state.suml2 > 0, ex.div(state.sumlx, state.suml2), 0.0)
  return jnp.where(empty, 0.0, scale), jnp.where(empty, 0, state.levels + nmax)


def make_qp_quants(
  ex: Exact, x: Float[Array, "n ..."], w: Float[Array, "n ..."], *, nmax: int
) -> tuple[Float[Array, "..."], Int[Array, "n ..."]]:
  """Positive scale for the sub-block scales of a super-block (``make_qp_quants``), with an importance matrix.

  Picks ``iscale = (nmax + 0.1 t) / max`` (t in -4..4) with the least ``sum w (x - l / iscale)^2``, then improves
  by `_descend`. Levels are stored as C's ``uint8_t`` (so a negative level wraps), as llama.cpp reads them back.

  Returns:
    scale: (...) float32; levels: (n, ...) int32 in ``[0, 256)``, 0 for a zero group.
  """
  # C's `max = MAX(max, x[i])` from 0; a max <= 0 (whatever the sign of zero) makes the group empty below.
  mx = jnp.maximum(jnp.max(x, axis=0), 0.0)
  wx = ex.mul(w, x)

  def mse(iscale, levels):
    diff = x - ex.mul(ex.div(np.float32(1.0), iscale), levels.astype(jnp.float32))
    return ex.csum(ex.mul(ex.mul(w, diff), diff))

  iscale = ex.div(np.float32(nmax), mx)
  best = mse(iscale, ex.nearest_int(ex.mul(iscale, x)) & 0xFF)

  def trial(carry, numerator):
    best, best_iscale = carry
    iscale = ex.div(numerator, mx)
    err = mse(iscale, jnp.minimum(nmax, ex.nearest_int(ex.mul(iscale, x))))
    better = err < best
    return (jnp.where(better, err, best), jnp.where(better, iscale, best_iscale)), None

  numerators = np.array([np.float32(0.1) * np.float32(t) + np.float32(nmax) for t in range(-4, 5) if t], np.float32)
  (_, iscale), _ = lax.scan(trial, (best, iscale), numerators)
  levels = jnp.minimum(nmax, ex.nearest_int(ex.mul(iscale, x)))
  lf = levels.astype(jnp.float32)
  sumlx = ex.csum(ex.mul(wx, lf))
  suml2 = ex.csum(ex.mul(ex.mul(w, lf), lf))
  levels, sumlx, suml2 = _descend(
    ex, x, w, Descent(levels & 0xFF, sumlx, suml2), lo=None, hi=nmax, store=lambda v: v & 0xFF, need_positive_sl2=True
  )
  scale = jnp.where(suml2 > 0, ex.div(sumlx, suml2), 0.0)
  empty = mx < GROUP_MAX_EPS
  return jnp.where(empty, 0.0, scale), jnp.where(empty, 0, levels)


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
    return jnp.clip(ex.nearest_int(ex.mul(iscale, x - m)), 0, nmax)

  def error(scale, m, lf):
    diff = ex.mul(scale, lf) + m - x
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
    jnp.where(empty, 0, levels(level_iscale, level_min)),
  )
