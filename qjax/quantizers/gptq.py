"""GPTQ: second-order rounding of one weight matrix against its input Hessian.

GPTQ quantizes the input channels of a weight one at a time and, after each, moves the
not-yet-quantized channels to cancel the output error that channel's rounding caused
(Optimal Brain Surgeon with a fixed order). The updates use the upper Cholesky factor of
``H⁻¹``, and are applied lazily: inside a block of `block_size` channels one at a time,
to the rest of the matrix once per block as a single matmul.

The core (`gptq_core`) is one jitted function whose loops are `jax.lax` loops, so its
trace does not grow with ``in_features``; `gptq_quantize` wraps it and raises when the
Hessian could not be inverted.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, Integer

from qjax.core import ClipSearch, QArray, QSpec, affine, from_codes

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


def _check_args(w, h, spec: QSpec, block_size: int, damp: float) -> None:
  if w.ndim != 2:
    raise ValueError(f"`gptq_quantize` expected a 2-D (in, out) kernel, got {w.shape=}.")
  if spec.is_ggml:
    raise NotImplementedError(f"`gptq_quantize` expected the packed affine layout, got ggml layout {spec.layout}.")
  spec.check_divides("gptq_quantize", w.shape[0], w.shape)
  if h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"`gptq_quantize` expected an (in, in) Hessian for w (in, out), got {h.shape=} and {w.shape=}.")
  if block_size <= 0:
    raise ValueError(f"`gptq_quantize` expected block_size > 0, got {block_size=}.")
  if not 0.0 <= damp < MAX_DAMP:
    raise ValueError(f"`gptq_quantize` expected 0 <= damp < {MAX_DAMP}, got {damp=}.")


def hessian_inverse(h: Float[Array, "in in"], *, damp: float) -> tuple[Float[Array, "in in"], Array, Bool[Array, ""]]:
  """Upper Cholesky factor of the dampened inverse Hessian, raising the dampening until it exists.

  Computes ``U = chol((h + λ·mean(diag h)·I)⁻¹)`` (upper, ``UᵀU = (…)⁻¹``) for
  ``λ = damp, damp + DAMP_STEP, …`` up to ``MAX_DAMP`` until ``U`` is finite; a failed
  Cholesky in JAX yields NaN rather than raising. The reference factors twice
  (``cholesky_inverse(chol(H))``, then an upper Cholesky of that inverse); with the
  reversal ``J``, ``JHJ = MMᵀ`` gives ``H = (JMJ)(JMJ)ᵀ`` with ``JMJ`` upper, so
  ``U = (JMJ)⁻¹ = J M⁻¹ J`` by uniqueness of the factor: one factorisation, one
  triangular solve, and no explicit inverse.

  Args:
    h: (in, in) float32 symmetric Hessian, dead inputs already set to ``h[i, i] = 1``.
    damp: first relative dampening λ.

  Returns:
    u: (in, in) float32 upper triangular (exact zeros below the diagonal).
    damp: () float32, the λ of `u`.
    ok: () bool, whether `u` is finite.
  """
  n = h.shape[0]
  mean = jnp.mean(jnp.diagonal(h))
  tries = math.ceil((MAX_DAMP - damp) / DAMP_STEP)

  def attempt(k):
    lam = damp + k.astype(jnp.float32) * DAMP_STEP
    lower = jnp.linalg.cholesky((h + lam * mean * jnp.eye(n, dtype=h.dtype))[::-1, ::-1])
    u = jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=h.dtype), lower=True)[::-1, ::-1]
    return jnp.triu(u), lam, jnp.all(jnp.isfinite(u))

  def cond(state):
    k, *_, ok = state
    return ~ok & (k < tries)

  def body(state):
    k = state[0] + 1
    return (k, *attempt(k))

  _, u, lam, ok = jax.lax.while_loop(cond, body, (jnp.int32(0), *attempt(jnp.int32(0))))
  return u, lam, ok


def _round_column(
  x: Float[Array, " out"], params: affine.AffineParams, g: Int[Array, ""], bits: int
) -> tuple[Integer[Array, " out"], Float[Array, " out"]]:
  """Code and value of one input channel on group `g`'s grid (`qjax.core.affine` conventions)."""
  col = affine.AffineParams(params.scale[g][None], None if params.zero is None else params.zero[g][None])
  code = affine.quantize_groups(x[None, None], col, bits)
  return code[0, 0], affine.dequantize_groups(code, col, bits)[0, 0]


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
  params: affine.AffineParams,
  col_group: Int[Array, " k"],
  *,
  spec: QSpec,
  block: int,
  n: int,
  dynamic: bool,
  clip: ClipSearch | None,
) -> tuple[Integer[Array, "k out"], affine.AffineParams, Float[Array, ""]]:
  """GPTQ's lazy-batch sweep over the rows (input channels) of `w`, in order.

  Args:
    w: (k, out) float32, k a multiple of `block`; rows ``>= n`` are zero padding.
    u: (k, k) float32 upper Cholesky factor of ``H⁻¹`` (identity on the padding).
    params: (groups, out) grid of each group; with `dynamic`, filled in by the sweep.
    col_group: (k,) int32 group of each row.
    spec: bits, group size, symmetry and scale dtype.
    block: rows per lazy batch.
    n: number of real rows.
    dynamic: find each group's grid when the sweep reaches its first row.
    clip: optional MSE clipping search for those grids.

  Returns:
    (k, out) uint8 codes, the (groups, out) params, and the loss ``½ Σ err²``.
  """
  group = spec.group_length(n)

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
          new = affine.find_params(_group_window(w, w1, err1, u_rows, col, i1, group)[None], spec, clip=clip)
          put = lambda buf, row: None if buf is None else jax.lax.dynamic_update_index_in_dim(buf, row, col // group, 0)
          return affine.AffineParams(*map(put, params, new))

        params = jax.lax.cond((col % group == 0) & (col < n), refresh, lambda p: p, params)
      code, value = _round_column(w1[i], params, col_group[col], spec.bits)
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


def _empty_params(w: Float[Array, "in out"], groups: int, spec: QSpec) -> affine.AffineParams:
  shape = (groups, w.shape[1])  # zeros_like: see `_sweep`.
  zero = None if spec.symmetric else jnp.zeros_like(w, jnp.int32, shape=shape)
  return affine.AffineParams(jnp.zeros_like(w, spec.scale_dtype, shape=shape), zero)


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


def _gptq_arrays(w, h, *, spec, block_size, damp, act_order, static_groups, clip, group_aware=False):
  """GPTQ on (in, out) `w`; returns (in, out) uint8 codes, params, perm or None, `GptqInfo`."""
  n = w.shape[0]
  group, groups = spec.group_length(n), spec.num_groups(n)
  w, h = w.astype(jnp.float32), h.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0.0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[:, None], 0.0, w)
  dynamic = spec.group_size != -1 and not static_groups
  # Static groups (and the single per-channel group) take their grid from the weights
  # before any update, in the original channel order.
  params = (
    _empty_params(w, groups, spec) if dynamic else affine.find_params(affine.group_view(w, spec), spec, clip=clip)
  )
  if group_aware and dynamic:
    order = group_aware_order(jnp.diagonal(h), group)
  elif act_order:
    order = jnp.argsort(-jnp.diagonal(h), stable=True)
  else:
    order = jnp.arange(n)
  w, h = w[order], h[order][:, order]
  u, lam, ok = hessian_inverse(h, damp=damp)

  block = min(block_size, n)
  # Whole blocks, and whole groups: a shorter last group (`spec.partial_groups`) reads zero rows.
  k = -(-max(n, groups * group) // block) * block
  # Padding rows are dead inputs with an identity Hessian block: zero weights, no coupling.
  w = jnp.pad(w, ((0, k - n), (0, 0)))
  u = jnp.pad(u, ((0, k - n), (0, k - n))) + jnp.diag((jnp.arange(k) >= n).astype(jnp.float32))
  col_group = jnp.minimum(jnp.arange(k) if dynamic else jnp.pad(order, (0, k - n)), n - 1) // group
  codes, params, loss = _sweep(w, u, params, col_group, spec=spec, block=block, n=n, dynamic=dynamic, clip=clip)
  codes = codes[:n]
  keep_perm = _keeps_perm(spec, act_order=act_order, static_groups=static_groups)
  if (act_order or group_aware) and not keep_perm:
    codes = codes[jnp.argsort(order)]
  if group_aware and dynamic:
    # The sweep met whole groups in a new order; put their grids back in group order.
    group_order = order[::group][:groups] // group
    params = affine.AffineParams(*(None if a is None else a[jnp.argsort(group_order)] for a in params))
  info = GptqInfo(damp=lam, loss=loss, ok=ok, dead=jnp.sum(dead, dtype=jnp.int32))
  return codes, params, order if keep_perm else None, info


def _mesh_axes(mesh: Mesh, mesh_axis: str | tuple[str, ...] | None) -> tuple[str, ...]:
  axes = mesh.axis_names if mesh_axis is None else (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"`gptq_quantize` expected mesh_axis among {mesh.axis_names}, got {mesh_axis!r}.")
  return axes


def _sharded_arrays(w, h, *, mesh, mesh_axis, **config):
  """`_gptq_arrays` with the output channels split over `mesh_axis`; H is replicated."""
  axes = _mesh_axes(mesh, mesh_axis)
  shards = math.prod(mesh.shape[a] for a in axes)
  if w.shape[1] % shards:
    raise ValueError(
      f"`gptq_quantize` expected out_features divisible by the {shards} devices of mesh axes {axes}, "
      f"got {w.shape=}; pass mesh=None or a mesh axis whose size divides {w.shape[1]}."
    )
  split = P(None, axes)

  def shard(w, h):
    codes, params, perm, info = _gptq_arrays(w, h, **config)
    # The Hessian, hence damp, ok, dead and the permutation, are the same on every shard.
    return codes, params, perm, info._replace(loss=jax.lax.psum(info.loss, axes))

  if any(mesh.axis_types[mesh.axis_names.index(a)] == AxisType.Explicit for a in axes):
    # shard_map over explicit axes takes inputs already laid out as in_specs says.
    w, h = jax.reshard(w, NamedSharding(mesh, split)), jax.reshard(h, NamedSharding(mesh, P()))
  zero = None if config["spec"].symmetric else split
  perm = (
    P() if _keeps_perm(config["spec"], act_order=config["act_order"], static_groups=config["static_groups"]) else None
  )
  out_specs = (split, affine.AffineParams(split, zero), perm, GptqInfo(P(), P(), P(), P()))
  return jax.shard_map(shard, mesh=mesh, in_specs=(split, P()), out_specs=out_specs)(w, h)


@functools.partial(
  jax.jit,
  static_argnames=(
    "spec",
    "block_size",
    "damp",
    "act_order",
    "static_groups",
    "clip",
    "mesh",
    "mesh_axis",
    "group_aware",
  ),
)
def gptq_core(
  w: Float[Array, "in out"],
  h: Float[Array, "in in"],
  *,
  spec: QSpec,
  block_size: int = 128,
  damp: float = 0.01,
  act_order: bool = False,
  static_groups: bool = False,
  clip: ClipSearch | None = None,
  mesh: Mesh | None = None,
  mesh_axis: str | tuple[str, ...] | None = None,
  group_aware: bool = False,
) -> tuple[QArray, GptqInfo]:
  """Jitted GPTQ; like `gptq_quantize` but returns ``info.ok`` instead of raising (usable under jit)."""
  _check_args(w, h, spec, block_size, damp)
  if group_aware and act_order:
    raise ValueError("`gptq_quantize` expected at most one of act_order and group_aware, got both.")
  config = dict(
    spec=spec,
    block_size=block_size,
    damp=damp,
    act_order=act_order,
    static_groups=static_groups,
    clip=clip,
    group_aware=group_aware,
  )
  if mesh is None:
    codes, params, perm, info = _gptq_arrays(w, h, **config)
  else:
    codes, params, perm, info = _sharded_arrays(w, h, mesh=mesh, mesh_axis=mesh_axis, **config)
  return from_codes(codes, params, spec, perm=perm, dtype=w.dtype), info


def gptq_quantize(
  w: Float[Array, "in out"],
  h: Float[Array, "in in"],
  *,
  spec: QSpec,
  block_size: int = 128,
  damp: float = 0.01,
  act_order: bool = False,
  static_groups: bool = False,
  clip: ClipSearch | None = None,
  mesh: Mesh | None = None,
  mesh_axis: str | tuple[str, ...] | None = None,
  group_aware: bool = False,
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
  while the Cholesky fails. A group's grid (`qjax.core.affine` conventions, with the
  optional `clip` search) is found when the sweep reaches its first channel, on that
  group's updated weights; with `static_groups`, or per-channel grids, it is found up front
  from the original weights. Rows are independent given ``H``: with `mesh`, the output
  channels are split over devices (``jax.shard_map``, ``H`` replicated) with identical results.

  Args:
    w: (in, out) float32|bfloat16|float16 Flax kernel (contraction axis 0).
    h: (in, in) float32 Hessian ``2XᵀX/n`` or ``XᵀX`` of the inputs of `w` (its scale
      does not matter).
    spec: bits, group size (dividing ``in``, or -1), symmetry, scale dtype; ``packed`` layout.
    block_size: input channels per lazy batch; affects speed only.
    damp: initial dampening, relative to ``mean(diag h)``, in ``[0, MAX_DAMP)``.
    act_order: sweep the channels by decreasing ``h[i, i]`` (GPTQ's ``desc_act``).
    group_aware: GPTQModel's group-aware reordering (``act_group_aware``): sweep whole groups
      by decreasing max ``h[i, i]`` and the channels inside each likewise; grids are found per
      group as the sweep reaches it and the result needs no permutation. Excludes `act_order`.
    static_groups: with `act_order`, keep groups (and their grids) in the original
      channel order, so the result needs no permutation.
    clip: optional MSE clipping search for the group grids.
    mesh: optional device mesh; ``out`` must be divisible by the size of `mesh_axis`.
    mesh_axis: mesh axis name(s) to split ``out`` over; default all axes of `mesh`.

  Returns:
    A `QArray` with the shape and dtype of `w`. With `act_order` and dynamic groups
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
  q, info = gptq_core(
    w,
    h,
    spec=spec,
    block_size=block_size,
    damp=damp,
    act_order=act_order,
    static_groups=static_groups,
    clip=clip,
    mesh=mesh,
    mesh_axis=mesh_axis,
    group_aware=group_aware,
  )
  try:
    ok = bool(info.ok)
  except jax.errors.ConcretizationTypeError as e:
    raise TypeError(TRACED_MSG) from e
  if not ok:
    raise ValueError(NOT_PD_MSG.format(shape=tuple(w.shape), damp=float(info.damp)))
  return q, info
