"""GPTQ: second-order rounding of one weight matrix against its input Hessian.

GPTQ quantizes the input channels of a weight one at a time and, after each, moves the
not-yet-quantized channels to cancel the output error that channel's rounding caused
(Optimal Brain Surgeon with a fixed order). The updates use the upper Cholesky factor of
``H⁻¹``, and are applied lazily: inside a block of `block_size` channels one at a time,
to the rest of the matrix once per block as a single matmul.

The core (`gptq_core`) is two jitted programs, the factorisation of ``H`` and the sweep, whose
loops are `jax.lax` loops, so their traces do not grow with ``in_features``; `gptq_quantize`
wraps it and raises when the Hessian could not be inverted. Codes are chosen on the spec's rounding grid through the
`qjax.core.grid.Grid` protocol alone (``fit`` when the sweep enters a group, ``round`` per
column), so GPTQ rounds into any grid: affine, a llama.cpp block type, a codebook.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, Integer

from qjax.core import ClipSearch, QArray, QSpec, from_codes
from qjax.core.grid import Grid, GroupParams, empty_params, group_params, set_group_params
from qjax.core.qarray import clipped_grid, group_view

DAMP_STEP = 0.01
"""How much the relative dampening grows per failed Cholesky (GPTQModel's `damp_auto_increment`)."""

MAX_DAMP = 1.0
"""The largest relative dampening tried before giving up."""

_HIGHEST = jax.lax.Precision.HIGHEST  # TF32 matmuls on GPU would perturb the rounding decisions.

NOT_PD_MSG = (
  "`gptq_quantize`: the Hessian for the {shape} weight is not positive definite after raising damp to "
  "{damp:.2f} (damp is relative to mean(diag(h))). Check that h is XᵀX accumulated in float32 over the "
  "inputs of this weight (no NaN/inf, no negative eigenvalues), or pass a larger `damp`."
)

TRACED_MSG = (
  "`gptq_quantize` checks on the host that the Hessian could be inverted, so it cannot run under a "
  "jax transformation; call `gptq_core` there and check the returned `GptqInfo.ok` yourself."
)


class GptqInfo(NamedTuple):
  """Diagnostics of one GPTQ run.

  Attributes:
    damp: () float32, the dampening used, as a fraction of ``mean(diag(h))``: the requested
      `damp`, or more if the Cholesky factorisation failed with it.
    loss: () float32, GPTQ's error estimate ``½ Σ (w - q)² / d²`` (the reference's
      ``sum(Losses)``). With ``h = 2XᵀX/n`` and no dampening it equals the mean output error
      ``‖X (w - ŵ)‖² / n``; with ``h = XᵀX`` it is half of ``‖X (w - ŵ)‖²``.
    ok: () bool, whether the (dampened) Hessian was positive definite; if False the codes
      are meaningless.
    dead: () int32, number of dead inputs (``h[i, i] == 0``), quantized to zero.
  """

  damp: Array
  loss: Array
  ok: Array
  dead: Array


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GptqConfig:
  """How GPTQ sweeps and dampens (GPTQModel's names in parentheses); static under jit.

  Attributes:
    block_size: input channels per lazy batch; affects speed only.
    damp: initial dampening, relative to ``mean(diag h)``, in ``[0, MAX_DAMP)`` (``damp_percent``).
    act_order: sweep the channels by decreasing ``h[i, i]`` (``desc_act``).
    group_aware: group-aware reordering (``act_group_aware``): sweep whole groups by decreasing max ``h[i, i]``
      and the channels inside each likewise; grids are fitted per group as the sweep reaches it and the result
      needs no permutation. Excludes `act_order`.
    static_groups: with `act_order`, keep groups (and their grids) in the original channel order, so the result
      needs no permutation (``static_groups``).
    clip: optional MSE clipping search for the affine group grids (``mse``).

  Examples:
    >>> GptqConfig(act_order=True).damp
    0.01
  """

  block_size: int = 128
  damp: float = 0.01
  act_order: bool = False
  group_aware: bool = False
  static_groups: bool = False
  clip: ClipSearch | None = None

  def __post_init__(self):
    if self.block_size <= 0:
      raise ValueError(f"`GptqConfig` expected block_size > 0, got {self.block_size=}.")
    if not 0.0 <= self.damp < MAX_DAMP:
      raise ValueError(f"`GptqConfig` expected 0 <= damp < {MAX_DAMP}, got {self.damp=}.")
    if self.group_aware and self.act_order:
      raise ValueError("`GptqConfig` expected at most one of act_order and group_aware, got both.")


def _check_args(w, h, spec: QSpec) -> None:
  if w.ndim != 2:
    raise ValueError(f"`gptq_quantize` expected a 2-D (in, out) kernel, got {w.shape=}.")
  spec.check_divides("gptq_quantize", w.shape[0], w.shape)
  if h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"`gptq_quantize` expected an (in, in) Hessian for w (in, out), got {h.shape=} and {w.shape=}.")


def hessian_inverse(
  h: Float[Array, "in in"], *, damp: float, order: Int[Array, " in"] | None = None
) -> tuple[Float[Array, "in in"], Array, Bool[Array, ""]]:
  """Upper Cholesky factor of the dampened inverse Hessian, raising the dampening until it exists.

  Computes ``U = chol((P h Pᵀ + λ·mean(diag h)·I)⁻¹)`` (upper, ``UᵀU = (…)⁻¹``) for the permutation ``P`` that
  puts the inputs in `order`, and ``λ = damp, damp + DAMP_STEP, …`` up to ``MAX_DAMP`` until ``U`` is finite
  (a failed Cholesky in JAX yields NaN rather than raising). Dead inputs (``h[i, i] == 0``) count as
  ``h[i, i] = 1``. The reference factors twice (``cholesky_inverse(chol(H))``, then an upper Cholesky of that
  inverse); with the reversal ``J``, ``JHJ = MMᵀ`` gives ``H = (JMJ)(JMJ)ᵀ`` with ``JMJ`` upper, so
  ``U = (JMJ)⁻¹ = J M⁻¹ J`` by uniqueness of the factor: one factorisation, one triangular solve, and no
  explicit inverse.

  In one program; `gptq_quantize` runs the same steps as separate programs (`_factor_programs`), which hold fewer
  (in, in) buffers at once, with the same results.

  Args:
    h: (in, in) float32 symmetric Hessian.
    damp: first relative dampening λ.
    order: optional (in,) int permutation of the inputs (GPTQ's sweep order); default as they are.

  Returns:
    u: (in, in) float32 upper triangular (exact zeros below the diagonal), in `order`.
    damp: () float32, the λ of `u`.
    ok: () bool, whether `u` is finite.
  """
  return _inverse_factor(*_reversed_hessian(h, order), damp)


def _reversed_hessian(h: Float[Array, "in in"], order: Int[Array, " in"] | None) -> tuple[Array, Array]:
  """(``J P H' Pᵀ J``, mean of the diagonal of ``H'``): ``H'`` is `h` symmetrised with dead inputs set to 1, made
  by one fusion (`cholesky` would symmetrise again), and the mean is summed in the sweep order, as the reference
  does on its permuted H (its last bit moves codes)."""
  n = h.shape[0]
  dead = jnp.diagonal(h) == 0.0
  diag = jnp.diagonal(h) + dead
  mean = jnp.mean(diag if order is None else diag[order])
  diagonal = jnp.arange(n)
  base = (h + h.T) / 2 + jnp.where(diagonal[:, None] == diagonal[None, :], dead[None, :].astype(h.dtype), 0.0)
  return (base[::-1, ::-1] if order is None else base[order[::-1]][:, order[::-1]]), mean


def _tries(damp: float) -> int:
  return math.ceil((MAX_DAMP - damp) / DAMP_STEP)


def _lower_factor(reversed_h: Array, mean: Array, k: Array, damp: float) -> tuple[Array, Array]:
  """(the lower Cholesky factor of ``reversed_h + λ·mean·I``, NaN where there is none; λ), λ the `k`-th dampening
  tried, ``damp + k·DAMP_STEP``."""
  lam = damp + k.astype(jnp.float32) * DAMP_STEP
  diagonal = jnp.arange(reversed_h.shape[0])
  lower = jax.lax.linalg.cholesky(reversed_h.at[diagonal, diagonal].add(lam * mean), symmetrize_input=False)
  return lower, lam


def _factors(reversed_h: Array, mean: Array, k: Array, damp: float) -> Array:
  """Whether the `k`-th dampening gives a factor (a failed one is all NaN: its diagonal says so)."""
  return jnp.all(jnp.isfinite(jnp.diagonal(_lower_factor(reversed_h, mean, k, damp)[0])))


def _inverse_factor(reversed_h: Array, mean: Array, damp: float) -> tuple[Array, Array, Array]:
  """`hessian_inverse` of a `_reversed_hessian`: (U, λ, whether U is finite)."""

  def cond(state):
    k, ok = state
    return ~ok & (k < _tries(damp))

  def body(state):
    k = state[0] + 1
    return k, _factors(reversed_h, mean, k, damp)

  # The loop carries only its flag (carrying the factor, or keeping a first try beside the retry branch, holds one
  # or two more (in, in) buffers) and the factor is made once more after it.
  k, _ = jax.lax.while_loop(cond, body, (jnp.int32(-1), jnp.bool_(False)))
  lower, lam = _lower_factor(reversed_h, mean, k, damp)
  u, ok = _inverse(lower)
  return u, lam, ok


def _inverse(lower: Array) -> tuple[Array, Array]:
  """(``U = J M⁻¹ J`` for the lower factor ``M``, whether U is finite)."""
  eye = jnp.eye(lower.shape[0], dtype=lower.dtype)
  u = jax.lax.linalg.triangular_solve(lower, eye, left_side=True, lower=True)[::-1, ::-1]
  return u, jnp.all(jnp.isfinite(u))


def _round_column(
  grid: Grid, x: Float[Array, " out"], params: GroupParams, g: Int[Array, ""], position: Int[Array, ""]
) -> tuple[Integer[Array, " out"], Float[Array, " out"]]:
  """Code and value of one input channel, at `position` inside group `g`, on that group's grid."""
  code, value = grid.round(x[None, None], group_params(params, g), position[None])
  return code[0, 0], value[0, 0]


def _group_window(
  w: Float[Array, "k out"],
  w1: Float[Array, "block out"],
  err1: Float[Array, "block out"],
  u_rows: Float[Array, "block k"],
  col: Int[Array, ""],
  i1: Int[Array, ""],
  group: int,
) -> Float[Array, "group out"]:
  """Current weights of rows ``col .. col + group``, all updates so far applied.

  Rows inside the block (``i1 ..``) come from the block buffer `w1`; later rows from `w`,
  minus the part of this block's update not yet applied to them (``u_rowsᵀ · err1`` on
  those rows; the rows of `err1` not yet swept are zero). AutoGPTQ reads these rows from `W` alone, which
  misses the in-block updates when a group starts inside a block; this is the per-column
  algorithm, so the result does not depend on `block_size`.
  """
  rows = col + jnp.arange(group)
  from_block = jnp.take(w1, rows - i1, axis=0, mode="clip")
  pending = jnp.matmul(jax.lax.dynamic_slice_in_dim(u_rows, col, group, axis=1).T, err1, precision=_HIGHEST)
  later = jax.lax.dynamic_slice_in_dim(w, col, group) - pending
  return jnp.where((rows < i1 + w1.shape[0])[:, None], from_block, later)


def _sweep(
  w: Float[Array, "k out"],
  u: Float[Array, "k k"],
  params: GroupParams,
  col_group: Int[Array, " k"],
  position: Int[Array, " k"],
  importance: Float[Array, " k"],
  *,
  grid: Grid,
  group: int,
  block: int,
  n: int,
  dynamic: bool,
) -> tuple[Integer[Array, "k out"], GroupParams, Float[Array, ""]]:
  """GPTQ's lazy-batch sweep over the rows (input channels) of `w`, in order.

  Args:
    w: (k, out) float32, k a multiple of `block`; rows ``>= n`` are zero padding.
    u: (k, k) float32 upper Cholesky factor of ``H⁻¹`` (identity on the padding).
    params: the grid's parameters of each group; with `dynamic`, filled in by the sweep.
    col_group: (k,) int32 group of each row.
    position: (k,) int32 place of each row inside its group in the original order (a block grid's sub-blocks
      are fixed runs of it, whatever order the sweep visits them in).
    importance: (k,) float32 importance of each row (``H_ii``), for grids whose fit weighs it.
    grid: the rounding grid.
    group: rows per group.
    block: rows per lazy batch.
    n: number of real rows.
    dynamic: fit each group's grid when the sweep reaches its first row.

  Returns:
    (k, out) uint8 codes, the grid's params, and the loss ``½ Σ err²``.
  """

  def block_body(b, carry):
    w, codes, params, loss = carry
    i1 = b * block
    u_rows = jax.lax.dynamic_slice_in_dim(u, i1, block)  # (block, k): U's rows of this block
    u11 = jax.lax.dynamic_slice_in_dim(u_rows, i1, block, axis=1)
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, block)

    def column(i, c):
      w1, err1, q1, params, loss = c
      col = i1 + i
      if dynamic:

        def refresh(params):
          window = _group_window(w, w1, err1, u_rows, col, i1, group)
          # The grid sees the group's rows in their original places.
          back = jnp.argsort(jax.lax.dynamic_slice_in_dim(position, col, group))
          new = grid.fit(window[back][None], jax.lax.dynamic_slice_in_dim(importance, col, group)[back][None])
          return set_group_params(params, col // group, new)

        params = jax.lax.cond((col % group == 0) & (col < n), refresh, lambda p: p, params)
      code, value = _round_column(grid, w1[i], params, col_group[col], position[col])
      err = (w1[i] - value) / u11[i, i]
      # Row i of u11 is zero left of the diagonal, so rows already swept are left unchanged.
      w1 = w1 - u11[i][:, None] * err[None, :]
      return w1, err1.at[i].set(err), q1.at[i].set(code), params, loss + 0.5 * jnp.sum(err * err)

    init = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1, jnp.uint8), params, loss)
    _, err1, q1, params, loss = jax.lax.fori_loop(0, block, column, init)
    # u_rows is zero left of the block, so one full-height matmul updates exactly the later rows
    # (the block's own rows change too, but they are never read again).
    w = w - jnp.matmul(u_rows.T, err1, precision=_HIGHEST)
    return w, jax.lax.dynamic_update_slice_in_dim(codes, q1, i1, 0), params, loss

  # zeros_like, not zeros: under shard_map the carries must vary over devices like `w`.
  init = (w, jnp.zeros_like(w, jnp.uint8), params, jnp.zeros_like(w, shape=()))
  _, codes, params, loss = jax.lax.fori_loop(0, w.shape[0] // block, block_body, init)
  return codes, params, loss


def _keeps_perm(spec: QSpec, *, act_order: bool, static_groups: bool) -> bool:
  """Whether groups run in the sweep order, so the QArray must carry the permutation."""
  return act_order and spec.group_size != -1 and not static_groups


def group_aware_order(diag: Float[Array, " n"], group: int) -> Int[Array, " n"]:
  """Group-aware reordering (GAR): whole groups by decreasing max ``H_ii``, channels within a group likewise.

  Groups stay contiguous runs of the original channels, so the result needs no ``g_idx``.
  A shorter last group (partial groups) stays last, keeping group boundaries at multiples of `group`.
  """
  n = diag.shape[0]
  full = n // group
  blocks = diag[: full * group].reshape(full, group)
  local = jnp.argsort(-blocks, axis=1, stable=True) + group * jnp.arange(full)[:, None]
  global_order = jnp.argsort(-blocks.max(axis=1), stable=True)
  order = local[global_order].reshape(-1)
  if full * group < n:
    tail = diag[full * group :]
    order = jnp.concatenate([order, full * group + jnp.argsort(-tail, stable=True)])
  return order


class _Factored(NamedTuple):
  """What GPTQ's sweep needs of the Hessian (all it needs: ``h`` itself can go before the sweep)."""

  u: Array  # (in, in) upper Cholesky factor of the dampened H⁻¹, in sweep order
  damp: Array  # () the dampening of `u`
  ok: Array  # () whether `u` is finite
  importance: Array  # (in,) H_ii, dead inputs 1, in the original order
  order: Array  # (in,) the sweep order
  dead: Array  # (in,) bool, H_ii == 0


class _Prepared(NamedTuple):
  """The Hessian made ready to factor, and its sweep order (`_prepare`)."""

  reversed_h: Array  # (in, in) symmetrised, dead inputs 1, in the sweep order reversed (`_reversed_hessian`)
  mean: Array  # () mean of its diagonal
  importance: Array  # (in,) H_ii, dead inputs 1, in the original order
  order: Array  # (in,) the sweep order
  dead: Array  # (in,) bool, H_ii == 0


def _prepare(h, *, spec: QSpec, config: GptqConfig) -> _Prepared:
  """The sweep order of (in, in) `h` (`config`'s act_order or group-aware order) and `h` made ready to factor in
  it."""
  n = h.shape[0]
  h = h.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0.0  # (`hessian_inverse` counts them as h[i, i] = 1)
  # A grid that weighs its fit (llama.cpp's block searches) weighs each input by H_ii, the mean x² of its
  # calibration inputs: llama.cpp's importance matrix of the same data.
  importance = jnp.diagonal(h) + dead
  dynamic = spec.group_size != -1 and not config.static_groups
  if config.group_aware and dynamic:
    order = group_aware_order(importance, spec.group_length(n))
  elif config.act_order:
    order = jnp.argsort(-importance, stable=True)
  else:
    order = None
  reversed_h, mean = _reversed_hessian(h, order)
  return _Prepared(reversed_h, mean, importance, jnp.arange(n) if order is None else order, dead)


def _factor(h, *, spec: QSpec, config: GptqConfig) -> _Factored:
  """`_prepare` and `hessian_inverse` in its order, in one program."""
  p = _prepare(h, spec=spec, config=config)
  return _Factored(*_inverse_factor(p.reversed_h, p.mean, config.damp), p.importance, p.order, p.dead)


class _FactorPrograms(NamedTuple):
  """`_factor`'s steps as separate programs on one device, so that about two (in, in) buffers exist at once (0.8 GB
  each for a 14336-wide input; `_factor` as one program holds 5.25, experiments/gptq_memory.md): the prepared copy
  beside the Hessian (written over it when donated), then beside each try's factor; the factor, made over it; the
  inverse beside the factor, then written over it. The retry loop runs on the host: as a while loop it keeps a
  copy of its operand. On CPU the (in, in) buffers are laid out column-major, as LAPACK factors them: from
  row-major ones XLA copies each into that layout first (a third buffer)."""

  prepare: Callable[..., _Prepared]  # (h, *, spec, config)
  factors: Callable[..., Array]  # (reversed_h, mean, k, damp): whether the k-th dampening factors
  lower: Callable[..., tuple[Array, Array]]  # (reversed_h (donated), mean, k, damp): (lower factor, λ)
  inverse: Callable[..., tuple[Array, Array]]  # (lower (donated)): (U, ok)


@functools.cache
def _factor_programs(device: jax.Device, donate_h: bool) -> _FactorPrograms:
  on = jax.sharding.SingleDeviceSharding(device)
  square = Format(Layout(major_to_minor=(1, 0)), on) if device.platform == "cpu" else on
  return _FactorPrograms(
    prepare=jax.jit(
      _prepare,
      static_argnames=("spec", "config"),
      out_shardings=_Prepared(square, on, on, on, on),
      donate_argnums=(0,) if donate_h else (),
    ),
    factors=jax.jit(_factors, static_argnums=3, in_shardings=(square, on, on)),
    lower=jax.jit(
      _lower_factor, static_argnums=3, in_shardings=(square, on, on), out_shardings=(square, on), donate_argnums=0
    ),
    inverse=jax.jit(_inverse, in_shardings=square, out_shardings=(on, on), donate_argnums=0),
  )


def _factor_separately(h, *, spec: QSpec, config: GptqConfig, donate_h: bool) -> _Factored:
  """`_factor` as `_FactorPrograms`, on `h`'s device (a numpy `h`: the default device)."""
  one_device = isinstance(h, jax.Array) and len(h.devices()) == 1
  programs = _factor_programs(next(iter(h.devices())) if one_device else jax.devices()[0], donate_h and one_device)
  p = programs.prepare(h, spec=spec, config=config)
  damp, tries = config.damp, _tries(config.damp)
  k = next((k for k in range(tries) if bool(programs.factors(p.reversed_h, p.mean, k, damp))), tries)
  lower, lam = programs.lower(p.reversed_h, p.mean, k, damp)  # (the last λ when none factors, as `_inverse_factor`)
  u, ok = programs.inverse(lower)
  return _Factored(u, lam, ok, p.importance, p.order, p.dead)


def _round(w, f: _Factored, *, spec: QSpec, config: GptqConfig):
  """GPTQ's sweep of (in, out) `w` with a factored Hessian; returns (in, out) uint8 codes, params, perm or None,
  `GptqInfo`."""
  act_order, group_aware, static_groups = config.act_order, config.group_aware, config.static_groups
  grid = clipped_grid(spec, config.clip)
  n = w.shape[0]
  group, groups = spec.group_length(n), spec.num_groups(n)
  u, order, importance = f.u, f.order, f.importance
  w = jnp.where(f.dead[:, None], 0.0, w.astype(jnp.float32))
  dynamic = spec.group_size != -1 and not static_groups
  # Static groups (and the single per-channel group) take their grid from the weights
  # before any update, in the original channel order.
  if dynamic:
    params = empty_params(grid, w, groups, group)
  else:
    params = grid.fit(group_view(w, spec), group_view(importance[:, None], spec)[..., 0])
  if (group_aware and dynamic) or act_order:
    w = w[order]

  block = min(config.block_size, n)
  # Whole blocks, and whole groups: a shorter last group (`spec.partial_groups`) reads zero rows.
  k = -(-max(n, groups * group) // block) * block
  # Padding rows are dead inputs with an identity Hessian block: zero weights, no coupling.
  if k > n:
    w = jnp.pad(w, ((0, k - n), (0, 0)))
    u = jnp.pad(u, ((0, k - n), (0, k - n))).at[jnp.arange(n, k), jnp.arange(n, k)].set(1.0)
  col_group = jnp.minimum(jnp.arange(k) if dynamic else jnp.pad(order, (0, k - n)), n - 1) // group
  importance = jnp.pad(importance[order], (0, k - n))
  position = jnp.concatenate([order % group, jnp.arange(n, k) % group])
  codes, params, loss = _sweep(
    w, u, params, col_group, position, importance, grid=grid, group=group, block=block, n=n, dynamic=dynamic
  )
  codes = codes[:n]
  keep_perm = _keeps_perm(spec, act_order=act_order, static_groups=static_groups)
  if (act_order or group_aware) and not keep_perm:
    codes = codes[jnp.argsort(order)]
  if group_aware and dynamic:
    # The sweep met whole groups in a new order; put their grids back in group order.
    group_order = order[::group][:groups] // group
    params = jax.tree.map(lambda a: a[jnp.argsort(group_order)], params)
  info = GptqInfo(damp=f.damp, loss=loss, ok=f.ok, dead=jnp.sum(f.dead, dtype=jnp.int32))
  return codes, params, order if keep_perm else None, info


def _gptq_arrays(w, h, *, spec: QSpec, config: GptqConfig):
  """`_factor` then `_round`, in one program (each shard of a split sweep factors the replicated Hessian)."""
  return _round(w, _factor(h, spec=spec, config=config), spec=spec, config=config)


def _mesh_axes(mesh: Mesh, mesh_axis: str | tuple[str, ...] | None) -> tuple[str, ...]:
  axes = mesh.axis_names if mesh_axis is None else (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"`gptq_quantize` expected mesh_axis among {mesh.axis_names}, got {mesh_axis!r}.")
  return axes


def _sharded_arrays(w, h, *, mesh, mesh_axis, spec: QSpec, config: GptqConfig):
  """GPTQ with the output channels split over `mesh_axis`; H is replicated, and so are the results
  (gathered in the program, so that every process can read them, also under ``jax.distributed``)."""
  axes = _mesh_axes(mesh, mesh_axis)
  shards = math.prod(mesh.shape[a] for a in axes)
  if w.shape[1] % shards:
    raise ValueError(
      f"`gptq_quantize` expected out_features divisible by the {shards} devices of mesh axes {axes}, "
      f"got {w.shape=}; pass mesh=None or a mesh axis whose size divides {w.shape[1]}."
    )
  split = P(None, axes)

  def shard(w, h):
    codes, params, perm, info = _gptq_arrays(w, h, spec=spec, config=config)
    # Every parameter of a grid ends in the output axis, which is what is split.
    codes, params = jax.tree.map(
      lambda a: jax.lax.all_gather(a, axes, axis=a.ndim - 1, tiled=True, to="invarying"), (codes, params)
    )
    # The Hessian, hence damp, ok, dead and the permutation, are the same on every shard.
    return codes, params, perm, info._replace(loss=jax.lax.psum(info.loss, axes))

  if any(mesh.axis_types[mesh.axis_names.index(a)] == AxisType.Explicit for a in axes):
    # shard_map over explicit axes takes inputs already laid out as in_specs says.
    w, h = jax.reshard(w, NamedSharding(mesh, split)), jax.reshard(h, NamedSharding(mesh, P()))
  keep_perm = _keeps_perm(spec, act_order=config.act_order, static_groups=config.static_groups)
  out_specs = (P(), P(), P() if keep_perm else None, GptqInfo(P(), P(), P(), P()))
  return jax.shard_map(shard, mesh=mesh, in_specs=(split, P()), out_specs=out_specs)(w, h)


def _as_qarray(codes, params, perm, w, spec: QSpec) -> QArray:
  if spec.is_ggml:  # the codes and scales become llama.cpp's block bytes
    blocks = spec.rounding_grid.pack(group_view(codes, spec), params)
    return QArray(blocks, None, None, None, spec, tuple(w.shape), np.dtype(w.dtype))
  return from_codes(codes, params, spec, perm=perm, dtype=w.dtype)


@functools.partial(jax.jit, static_argnames=("spec", "config", "mesh", "mesh_axis"))
def _sharded_core(w, h, *, spec, config, mesh, mesh_axis):
  codes, params, perm, info = _sharded_arrays(w, h, mesh=mesh, mesh_axis=mesh_axis, spec=spec, config=config)
  return _as_qarray(codes, params, perm, w, spec), info


@functools.partial(jax.jit, static_argnames=("spec", "config"))
def _round_core(w, factored, *, spec, config):
  codes, params, perm, info = _round(w, factored, spec=spec, config=config)
  return _as_qarray(codes, params, perm, w, spec), info


def _gptq(w, h, *, spec, config, mesh, mesh_axis, donate: bool) -> tuple[QArray, GptqInfo]:
  _check_args(w, h, spec)
  if spec.is_ggml and _keeps_perm(spec, act_order=config.act_order, static_groups=config.static_groups):
    raise ValueError(
      f"`gptq_quantize` into ggml {spec.layout} blocks expected an order that keeps each block's columns together "
      "(a GGUF file has no g_idx), got act_order; use group_aware, or act_order with static_groups."
    )
  if mesh is not None:
    return _sharded_core(w, h, spec=spec, config=config, mesh=mesh, mesh_axis=mesh_axis)
  if _traced(w, h):  # under a transformation the factorisation is a part of the caller's program
    factored = _factor(h, spec=spec, config=config)
  else:  # programs of its own, and the sweep's: the factorisation's buffers are gone before the sweep's exist
    factored = _factor_separately(h, spec=spec, config=config, donate_h=donate)
  return _round_core(w, factored, spec=spec, config=config)


def _traced(*arrays) -> bool:
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


def gptq_core(
  w: Float[Array, "in out"],
  h: Float[Array, "in in"],
  *,
  spec: QSpec,
  config: GptqConfig = GptqConfig(),
  mesh: Mesh | None = None,
  mesh_axis: str | tuple[str, ...] | None = None,
) -> tuple[QArray, GptqInfo]:
  """GPTQ as jitted programs; like `gptq_quantize` but returns ``info.ok`` instead of raising (usable under jit)."""
  return _gptq(w, h, spec=spec, config=config, mesh=mesh, mesh_axis=mesh_axis, donate=False)


def gptq_quantize(
  w: Float[Array, "in out"],
  h: Float[Array, "in in"],
  *,
  spec: QSpec,
  config: GptqConfig = GptqConfig(),
  mesh: Mesh | None = None,
  mesh_axis: str | tuple[str, ...] | None = None,
  donate_hessian: bool = False,
) -> tuple[QArray, GptqInfo]:
  """Quantizes a Flax kernel with GPTQ, given the Hessian of its inputs.

  With ``W = wᵀ`` (out, in) and calibration inputs ``X`` (n, in), GPTQ seeks codes whose
  values ``Ŵ`` minimise the layer's output error

  ``‖X Wᵀ - X Ŵᵀ‖²_F = Σ_rows (W - Ŵ)_r H (W - Ŵ)_rᵀ / 2``, with ``H = 2XᵀX``,

  greedily: input channel ``q`` (in order, or by decreasing ``H_qq`` with `act_order`) is
  rounded on its group's grid, and the remaining channels ``F`` absorb its error,
  ``W_F -= (W_q - Ŵ_q) [H_F⁻¹]_{q,F} / [H_F⁻¹]_qq``. Row ``q`` of the upper Cholesky
  factor ``U`` of ``H⁻¹`` holds ``[H_F⁻¹]_{q,F} / sqrt([H_F⁻¹]_qq)`` for every step, so the
  sweep needs one factorisation. Dead inputs (``H_qq = 0``) get ``H_qq = 1`` and zero weight;
  ``damp · mean(diag H)`` is added to the diagonal, and `damp` is raised by `DAMP_STEP`
  while the Cholesky fails. A group's grid parameters (``spec.rounding_grid.fit``; the affine grid's
  range, with ``config.clip`` its MSE search) are fitted when the sweep reaches the group's first
  channel, on its updated weights; with `static_groups`, or per-channel grids, up front from the
  original weights. Rows are independent given ``H``: with `mesh`, the output
  channels are split over devices (``jax.shard_map``, ``H`` replicated) with identical results,
  gathered back onto every device (so every process of a multi-process mesh can read them).

  Args:
    w: (in, out) float32|bfloat16|float16 Flax kernel (contraction axis 0).
    h: (in, in) float32 Hessian ``2XᵀX/n`` or ``XᵀX`` of the inputs of `w` (its scale
      does not matter).
    spec: the grid and group size (dividing ``in``, or -1); ``packed`` layout; a per-tensor grid parameter not
      yet set (NVFP4's global scale) is fixed from `w`'s original weights (`QSpec.for_tensor`).
    config: the sweep order, dampening and block size (`GptqConfig`).
    mesh: optional device mesh; ``out`` must be divisible by the size of `mesh_axis`.
    mesh_axis: mesh axis name(s) to split ``out`` over; default all axes of `mesh`.
    donate_hessian: `h`, a `jax.Array`, may be donated (deleted: its buffer holds the sweep order's copy of it),
      so the caller's Hessian is not kept beside GPTQ's working copies; without a mesh only.

  Returns:
    A `QArray` with the shape and dtype of `w`. With ``config.act_order`` and dynamic groups
    (``group_size != -1``, not `static_groups`) its ``perm`` is the sweep order and its
    codes and groups are in that order (GPTQ's ``g_idx = argsort(perm) // group_size``);
    otherwise ``perm`` is None.
    `GptqInfo`: () damp used, loss, ok, number of dead inputs.

  Raises:
    ValueError: for a group size that does not divide ``in``, an h that is not (in, in),
      ``out`` not divisible over the mesh, or a Hessian that is not positive definite even
      with the largest dampening.
    TypeError: under a jax transformation (use `gptq_core` there).

  References:
    Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
    Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1.
    Gafni, Karnieli, Hanani, "Dual Precision Quantization for Efficient and Accurate Deep Neural
    Networks Inference" (CVPRW 2025, arXiv:2505.14638) for group-aware reordering.
    Checked against AutoGPTQ ``auto_gptq/quantization/gptq.py`` ``GPTQ.fasterquant`` and
    GPTQModel ``gptqmodel/quantization/gptq.py`` ``hessian_inverse`` (dampening retries).

  Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((256, 64)).astype(np.float32)
    >>> w = rng.standard_normal((64, 8)).astype(np.float32)
    >>> q, info = gptq_quantize(w, x.T @ x, spec=QSpec(bits=4, group_size=32))
    >>> q.scale.shape, bool(info.ok), round(float(info.damp), 4)
    ((2, 8), True, 0.01)
  """
  if _traced(w, h):
    raise TypeError(TRACED_MSG)
  spec = spec.for_tensor(jnp.max(jnp.abs(jnp.asarray(w)))) if spec.needs_tensor_fit else spec
  donate = donate_hessian and mesh is None and isinstance(h, jax.Array)
  q, info = _gptq(w, h, spec=spec, config=config, mesh=mesh, mesh_axis=mesh_axis, donate=donate)
  if not bool(info.ok):
    raise ValueError(NOT_PD_MSG.format(shape=tuple(w.shape), damp=float(info.damp)))
  return q, info
