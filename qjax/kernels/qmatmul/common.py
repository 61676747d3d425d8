"""Checks and helpers shared by the qmatmul kernels: input validation, act-order, block and table lookup.

Every check works on shapes, dtypes and the static `QSpec` only, so it accepts
`jax.ShapeDtypeStruct` leaves (a `jax.eval_shape` of a `QArray`) as well as arrays.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from qjax.core import QArray
from qjax.kernels.qmatmul.layout import is_kernel_layout, layout_reason

ACTIVATION_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(jnp.float32))


def packed_int4_reason(q: QArray) -> str | None:
  """Why `q` is not a 4-bit packed weight with whole groups (the layouts kernels handle), or None."""
  return None if is_kernel_layout(q) else layout_reason(q)


def activation_reason(x, k: int, dtypes=ACTIVATION_DTYPES) -> str | None:
  """Why `x` is not a (..., k) activation of an allowed dtype, or None."""
  if x.ndim < 1 or x.shape[-1] != k:
    return f"x of shape (..., {k}), got {x.shape=}"
  if np.dtype(x.dtype) not in dtypes:
    return f"x dtype in {[str(d) for d in dtypes]}, got {x.dtype}"
  return None


def check_inputs(fn: str, x, q, dtypes=ACTIVATION_DTYPES) -> None:
  """Raises the standard errors for inputs a kernel wrapper cannot take."""
  reason = packed_int4_reason(q)
  if reason is not None:
    raise NotImplementedError(f"`{fn}`: {reason}.")
  reason = activation_reason(x, q.canonical_shape[0], dtypes)
  if reason is not None:
    raise ValueError(f"`{fn}` expected {reason}.")


def group_size(q: QArray) -> int:
  """Rows per group along k (k itself for per-channel specs)."""
  k = q.canonical_shape[0]
  return k if q.spec.group_size == -1 else q.spec.group_size


def permute_activations(x: Array, perm: Array | None) -> Array:
  """Act-order: row ``r`` of the codes holds input channel ``perm[r]``, so ``x @ W = x[..., perm] @ W_rows``."""
  return x if perm is None else jnp.take(x, perm, axis=-1)


def flatten_tokens(x: Array) -> tuple[Array, tuple[int, ...]]:
  """(..., k) -> (m, k) and the leading shape to restore."""
  return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def block_k_for(k: int, group: int, target: int, multiple: int) -> int | None:
  """The largest contraction block ``<= target`` that divides `k`, is a multiple of `multiple` and
  either holds whole groups or lies inside one group; None if there is none."""
  for bk in range(min(target, k) // multiple * multiple, 0, -multiple):
    if k % bk == 0 and (bk % group == 0 or group % bk == 0):
      return bk
  return None


def m_bucket(m: int) -> int:
  """Token count rounded up to a power of two: the shape key of the tuned tables."""
  return 1 << max(m - 1, 0).bit_length()


def lookup[Config](
  table: Mapping[tuple, Config], device_kind: str, dtype, k: int, n: int, m: int, default: Config
) -> Config:
  """A tuned config keyed by ``(device_kind, dtype name, k, n, m bucket)``, else `default`."""
  return table.get((device_kind, np.dtype(dtype).name, k, n, m_bucket(m)), default)


def target_device():
  """The device kernels are built for: the abstract mesh's device when one is set, else the default device.

  An abstract device (``jax.sharding.use_abstract_mesh``) is how a kernel is lowered for
  another platform, e.g. ``jax.export`` of the Hopper kernel on a CPU-only machine. Both
  kinds have ``platform``, ``device_kind`` and a core count (``core_count`` or ``num_cores``).
  """
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  return abstract if abstract is not None else jax.devices()[0]


def device_kind() -> str:
  """Kind of the target device, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu"``."""
  return target_device().device_kind
