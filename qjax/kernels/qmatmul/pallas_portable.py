"""W4A16 matmul as a backend-neutral `pl.pallas_call`: the readable kernel, run on CPU under ``interpret=True``.

It reads the interchange `QArray` layout as is: (k / 8, n) uint32 words, eight 4-bit codes
per word along k. Each program owns one (block_m, block_n) output tile and loops over k
in blocks of `block_k`: unpack a (block_k / 8, block_n) slab of words into (block_k,
block_n) codes, dequantize them with the slab's scales and zeros in float32 (exactly as
`qmatmul_reference` does, so the weights are bit-identical), cast to the activation dtype
and accumulate the dot in float32. The dense weight only ever exists one slab at a time.

It uses no backend-specific features (no scratch memory spaces, no compiler params), so
it is the oracle-shaped kernel the hardware kernels are compared with; `pallas_tpu` and
`pallas_hopper` are the tuned ones.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from qjax.core import QArray
from qjax.kernels.qmatmul import common

_CODES_PER_WORD = 8


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PortableConfig:
  """Tiling of `qmatmul_portable`.

  Attributes:
    block_m: tokens per program (the whole token axis if smaller).
    block_n: output channels per program (the whole axis if smaller).
    block_k: target contraction per loop step; the step used is the largest multiple of
      8 up to it that divides k and holds whole groups or lies inside one group.
  """

  block_m: int = 128
  block_n: int = 256
  block_k: int = 512

  def __post_init__(self):
    if min(self.block_m, self.block_n, self.block_k) <= 0 or self.block_k % _CODES_PER_WORD:
      raise ValueError(f"`PortableConfig` expected positive blocks and block_k % 8 == 0, got {self}.")


def unsupported_reason(x, q: QArray, *, config: PortableConfig | None = None) -> str | None:
  """Why `qmatmul_portable` cannot run ``x @ q``, or None. Accepts `jax.ShapeDtypeStruct` leaves."""
  reason = common.packed_int4_reason(q) or common.activation_reason(x, q.canonical_shape[0])
  if reason:
    return reason
  target = (config or PortableConfig()).block_k
  if common.block_k_for(q.canonical_shape[0], common.group_size(q), target, _CODES_PER_WORD) is None:
    return f"no contraction block <= {target} fits k={q.canonical_shape[0]} and group={common.group_size(q)}"
  return None


def supported(x, q: QArray, *, config: PortableConfig | None = None) -> bool:
  """True if `qmatmul_portable` handles these shapes and dtypes (any 4-bit packed spec with whole groups).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qjax.core import QSpec, quantize
    >>> q = jax.eval_shape(lambda: quantize(jnp.ones((96, 40)), QSpec(group_size=32, symmetric=False)))
    >>> supported(jax.ShapeDtypeStruct((3, 96), jnp.bfloat16), q)
    True
    >>> supported(jax.ShapeDtypeStruct((3, 64), jnp.bfloat16), q)
    False
  """
  return unsupported_reason(x, q, config=config) is None


def _kernel(x_ref, codes_ref, scale_ref, *refs, block_k: int, group: int, has_zero: bool):
  """One (block_m, block_n) output tile.

  Refs (default memory space, whole along k; host memory under the interpreter):
    x_ref: (block_m, k) activations.
    codes_ref: (k / 8, block_n) uint32 words.
    scale_ref: (groups, block_n) scales.
    zero_ref (if has_zero): (groups, block_n) int32 zero points.
    o_ref: (block_m, block_n) output, written once.
  """
  zero_ref, o_ref = refs if has_zero else (None, refs[0])
  k = x_ref.shape[1]
  words_per_block = block_k // _CODES_PER_WORD
  groups_per_block = max(block_k // group, 1)
  rows_per_group = min(block_k, group)
  block_n = codes_ref.shape[1]

  def group_rows(ref, i):
    """The block's per-group rows, repeated over their k-rows: (block_k, block_n) float32."""
    g0 = i * block_k // group
    rows = ref[pl.ds(g0, groups_per_block), :].astype(jnp.float32)
    return jnp.repeat(rows, rows_per_group, axis=0, total_repeat_length=block_k)

  def step(i, acc):
    words = codes_ref[pl.ds(i * words_per_block, words_per_block), :]
    nibbles = [(words >> (4 * t)) & 0xF for t in range(_CODES_PER_WORD)]  # code t of a word is k-row 8w + t
    codes = jnp.stack(nibbles, axis=1).reshape(block_k, block_n).astype(jnp.float32)
    zero = group_rows(zero_ref, i) if has_zero else 8.0
    w = (group_rows(scale_ref, i) * (codes - zero)).astype(x_ref.dtype)
    x = x_ref[:, pl.ds(i * block_k, block_k)]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, k // block_k, step, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


# Jitted so that identical calls (every layer of a model) are traced and lowered once.
@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def qmatmul_portable(
  x: Float[Array, "... k"], q: QArray, *, config: PortableConfig | None = None, interpret: bool = False
) -> Float[Array, "... n"]:
  """``x @ W`` for a 4-bit packed `QArray`, never materializing the dense ``W``.

  Same contract as `qmatmul_reference`; act-order permutes the activations once.

  Args:
    x: (..., k) float32|bfloat16|float16 activations.
    q: 4-bit ``packed`` `QArray` of canonical shape (k, n), whole groups (any group size).
    config: tiling (`PortableConfig()` if None).
    interpret: run the Pallas HLO interpreter (CPU).

  Returns:
    (..., n) in `x.dtype`, accumulated in float32.

  Raises:
    NotImplementedError: for other bit widths, ggml layouts or a shorter last group.
    ValueError: for activations of the wrong shape or dtype.
  """
  if not isinstance(q, QArray):
    raise TypeError(f"`qmatmul_portable` expected a QArray (see `from_kernel_layout`), got {type(q).__name__}.")
  common.check_inputs("qmatmul_portable", x, q)
  config = config or PortableConfig()
  reason = unsupported_reason(x, q, config=config)
  if reason:
    raise NotImplementedError(f"`qmatmul_portable`: {reason}.")
  k, n = q.canonical_shape
  group = common.group_size(q)
  x2, lead = common.flatten_tokens(common.permute_activations(x, q.perm))
  m = x2.shape[0]
  block_k = common.block_k_for(k, group, config.block_k, _CODES_PER_WORD)
  block_m, block_n = min(config.block_m, m), min(config.block_n, n)
  groups = q.scale.shape[0]
  column = lambda rows: pl.BlockSpec((rows, block_n), lambda i, j: (0, j))
  in_specs = [pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), column(k // _CODES_PER_WORD), column(groups)]
  operands = [x2, q.codes, q.scale]
  if q.zero is not None:
    in_specs.append(column(groups))
    operands.append(q.zero)
  kernel = functools.partial(_kernel, block_k=block_k, group=group, has_zero=q.zero is not None)
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
    grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
    interpret=interpret,
    name="qmatmul_portable",
  )(*operands)
  return out.reshape(*lead, n)
