"""W4A16 matmul for TPU with Mosaic TPU: a (m, n, k) grid, VMEM-pipelined weight slabs, a VMEM accumulator.

TPUs before v7 have no bf16 x int4 MXU path, so each step dequantizes a (block_k / 8,
block_n) slab of packed uint32 words on the VPU and feeds the MXU one bf16 (or f32) dot.

Unpacking without a sublane shuffle: word row ``w`` of the slab holds k-rows
``8w .. 8w + 7``. Shifting the whole slab by ``4t`` gives *plane* ``t``, the k-rows
``8w + t`` for every ``w``, already in (8, 128) tiles; the eight planes are stacked
along sublanes (``concatenate``, tile-aligned) into a (block_k, block_n) weight whose
row order is ``t * block_k / 8 + w``. The activations are permuted to match, once per
call outside the kernel (a (m, k) reshape-transpose, fused with the act-order gather):
activations are m x k, the weights k x n, so the permutation is cheap at any batch size.

Scales and zeros are reshaped (free) to (groups / r, r, n) so a block holds the ``r =
block_k / group`` rows of one step with its last two dims equal to the array's, as
Mosaic requires; within a plane a group spans ``group / 8`` rows, so the rows are
repeated by a tile-aligned broadcast-reshape when ``group / 8`` is a multiple of 8
(groups of 64, 128, or per channel). Groups of 32 fall back.

Dequantization runs in float32 (``s * (q - z)`` exactly as `qmatmul_reference`, and
v5e has no bf16 VPU), then casts to the activation dtype for the MXU.

Verification status: tested on CPU under `pltpu.InterpretParams`; not compiled by Mosaic
TPU or timed on a TPU in this repository yet.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from qjax.core import QArray
from qjax.kernels.qmatmul import common

DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))  # Mosaic TPU has no float16 arithmetic
_CODES_PER_WORD = 8
_LANES, _SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TpuConfig:
  """Tiling of `qmatmul_tpu`.

  Attributes:
    block_m: tokens per block, a multiple of 8 (the whole token axis if smaller).
    block_n: output channels per block, a multiple of 128 (the whole axis if smaller).
    block_k: target contraction per grid step, a multiple of 128; the step used is the
      largest multiple of 128 up to it that divides k and holds whole groups or lies in one.
  """

  block_m: int = 256
  block_n: int = 512
  block_k: int = 1024

  def __post_init__(self):
    if self.block_m % _SUBLANES or self.block_n % _LANES or self.block_k % _LANES or self.block_k <= 0:
      raise ValueError(f"`TpuConfig` expected block_m % 8 == 0, block_n % 128 == 0 and block_k % 128 == 0, got {self}.")


# Measured winners of scripts/bench_kernels.py keyed by (device kind, activation dtype, k, n,
# m bucket). Empty: no TPU has run the sweep yet, and no entry here is a guess.
TUNED: dict[tuple[str, str, int, int, int], TpuConfig] = {}


def _block_k(k: int, group: int, config: TpuConfig) -> int | None:
  return common.block_k_for(k, group, config.block_k, _LANES)


def unsupported_reason(x, q: QArray, *, config: TpuConfig | None = None, interpret=False) -> str | None:
  """Why `qmatmul_tpu` cannot run ``x @ q`` here, or None. Accepts `jax.ShapeDtypeStruct` leaves."""
  if not interpret and common.target_device().platform != "tpu":
    return "no TPU"
  reason = common.packed_int4_reason(q) or common.activation_reason(x, q.canonical_shape[0], DTYPES)
  if reason:
    return reason
  k, group = q.canonical_shape[0], common.group_size(q)
  block_k = _block_k(k, group, config or TpuConfig())
  if block_k is None:
    return f"no contraction block (a multiple of 128 dividing k={k}) fits group={group}"
  if block_k > group and (group // _CODES_PER_WORD) % _SUBLANES:
    return f"group={group} spans {group // _CODES_PER_WORD} rows of a plane, not whole (8, 128) tiles"
  return None


def supported(x, q: QArray, *, config: TpuConfig | None = None, interpret=False) -> bool:
  """True if `qmatmul_tpu` handles these shapes and dtypes on this device (or interpreted).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qjax.core import QSpec, quantize
    >>> q = jax.eval_shape(lambda: quantize(jnp.ones((512, 200)), QSpec(group_size=128)))
    >>> supported(jax.ShapeDtypeStruct((5, 512), jnp.bfloat16), q, interpret=True)
    True
    >>> q32 = jax.eval_shape(lambda: quantize(jnp.ones((512, 200)), QSpec(group_size=32)))
    >>> supported(jax.ShapeDtypeStruct((5, 512), jnp.bfloat16), q32, interpret=True)
    False
  """
  return unsupported_reason(x, q, config=config, interpret=interpret) is None


def plane_order(k: int, block_k: int) -> np.ndarray:
  """(k,) source column of each kernel column.

  Column ``t * block_k / 8 + w`` of block ``b`` is activation column ``b * block_k + 8w + t``.
  """
  idx = np.arange(k).reshape(k // block_k, block_k // _CODES_PER_WORD, _CODES_PER_WORD)
  return idx.swapaxes(1, 2).reshape(k)


def _expand_rows(rows: Array, height: int) -> Array:
  """(r, bn) per-group rows -> (height, bn), each repeated ``height / r`` times (tile-aligned)."""
  r, bn = rows.shape
  return jnp.broadcast_to(rows[:, None, :], (r, height // r, bn)).reshape(height, bn)


def _kernel(x_ref, codes_ref, scale_ref, *refs, has_zero: bool):
  """One k-step of one (block_m, block_n) output tile.

  Refs (VMEM blocks, DMA'd by the Pallas TPU pipeline):
    x_ref: (block_m, block_k) activations, columns in plane order (`plane_order`).
    codes_ref: (block_k / 8, block_n) uint32 words.
    scale_ref: (r, block_n) scales of the step's groups (r = 1 when a group spans steps).
    zero_ref (if has_zero): (r, block_n) int32 zero points.
    o_ref: (block_m, block_n) output, written at the last k-step.
    acc_ref: (block_m, block_n) float32 scratch accumulator.
  """
  zero_ref, o_ref, acc_ref = refs if has_zero else (None, *refs)
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  words = codes_ref[...]
  height = words.shape[0]
  scale = _expand_rows(scale_ref[...].astype(jnp.float32), height)
  zero = _expand_rows(zero_ref[...].astype(jnp.float32), height) if has_zero else 8.0
  planes = [
    scale * (((words >> (4 * t)) & 0xF).astype(jnp.int32).astype(jnp.float32) - zero) for t in range(_CODES_PER_WORD)
  ]
  w = jnp.concatenate(planes, axis=0).astype(x_ref.dtype)
  acc_ref[...] += jnp.dot(x_ref[...], w, preferred_element_type=jnp.float32)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


# Jitted so that identical calls (every layer of a model) are traced and lowered once.
@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def qmatmul_tpu(
  x: Float[Array, "... k"],
  q: QArray,
  *,
  config: TpuConfig | None = None,
  interpret: bool | pltpu.InterpretParams = False,
) -> Float[Array, "... n"]:
  """``x @ W`` on TPU for a 4-bit packed `QArray`, never materializing the dense ``W``.

  Same contract as `qmatmul_reference`.

  Args:
    x: (..., k) bfloat16|float32 activations.
    q: 4-bit ``packed`` `QArray` of canonical shape (k, n); groups of 64, 128 or per channel;
      k a multiple of 128.
    config: tiling; None looks up the tuned table, else `TpuConfig()`.
    interpret: run under TPU interpret mode on CPU (True or a `pltpu.InterpretParams`).

  Returns:
    (..., n) in `x.dtype`, accumulated in float32.

  Raises:
    NotImplementedError: for shapes, specs or dtypes the kernel does not take (see `supported`).
  """
  if not isinstance(q, QArray):
    raise TypeError(f"`qmatmul_tpu` expected a QArray (see `from_kernel_layout`), got {type(q).__name__}.")
  reason = unsupported_reason(x, q, config=config, interpret=bool(interpret))
  if reason:
    raise NotImplementedError(f"`qmatmul_tpu`: {reason}.")
  if interpret is True:
    interpret = pltpu.InterpretParams()
  k, n = q.canonical_shape
  group = common.group_size(q)
  x2, lead = common.flatten_tokens(x)
  m = x2.shape[0]
  config = config or common.lookup(TUNED, common.device_kind(), x.dtype, k, n, m, TpuConfig())
  block_k = _block_k(k, group, config)
  order = plane_order(k, block_k)
  x2 = jnp.take(x2, order if q.perm is None else q.perm[order], axis=-1)
  block_m = m if m <= config.block_m else config.block_m
  block_n = n if n <= config.block_n else config.block_n
  rows = max(block_k // group, 1)  # group rows per k-step
  steps_per_group = max(group // block_k, 1)
  by_step = lambda a: a.reshape(-1, rows, n)
  group_spec = pl.BlockSpec((pl.squeezed, rows, block_n), lambda i, j, s: (s // steps_per_group, 0, j))
  in_specs = [
    pl.BlockSpec((block_m, block_k), lambda i, j, s: (i, s)),
    pl.BlockSpec((block_k // _CODES_PER_WORD, block_n), lambda i, j, s: (s, j)),
    group_spec,
  ]
  operands = [x2, q.codes, by_step(q.scale)]
  if q.zero is not None:
    in_specs.append(group_spec)
    operands.append(by_step(q.zero))
  out = pl.pallas_call(
    functools.partial(_kernel, has_zero=q.zero is not None),
    out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
    grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n), k // block_k),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j)),
    scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret,
    name="qmatmul_tpu",
  )(*operands)
  return out.reshape(*lead, n)
