"""Round-to-nearest (RTN): the baseline every other quantizer is measured against."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core import ClipSearch, QArray, QSpec, quantize


def rtn_quantize(w: Float[Array, "in out"], *, spec: QSpec, axis: int = 0, clip: ClipSearch | None = None) -> QArray:
  """Quantizes each group to its nearest grid point; no calibration data.

  Minimises nothing beyond each weight's own rounding error:
  ``q = clip(round(w / s) + z, 0, 2**bits - 1)`` with ``s, z`` from the group's range
  (or, with `clip`, from the range shrink that minimises the group's ``L_norm`` error).

  Args:
    w: (in, out) float32|bfloat16|float16; groups run along `axis`.
    spec: bits, group size, symmetry, scale dtype (``packed`` layout); a per-tensor grid parameter not yet set
      (NVFP4's global scale) is fixed from `w` (`QSpec.for_tensor`).
    axis: contraction axis of `w` (0 for a Flax Dense kernel).
    clip: optional MSE clipping search (`qjax.core.ClipSearch`).

  Returns:
    A `QArray` with the shape and dtype of `w`.

  Raises:
    ValueError: if the group size does not divide the contraction axis.

  Examples:
    >>> import numpy as np
    >>> from qjax.core import dequantize
    >>> w = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    >>> q = rtn_quantize(w, spec=QSpec(bits=4, group_size=64))
    >>> q.codes.shape, q.scale.shape
    ((32, 16), (4, 16))
  """
  return _rtn(w, spec=spec.for_tensor(jnp.max(jnp.abs(w))) if spec.needs_tensor_fit else spec, axis=axis, clip=clip)


@functools.partial(jax.jit, static_argnames=("spec", "axis", "clip"))
def _rtn(w, *, spec: QSpec, axis: int, clip: ClipSearch | None) -> QArray:
  return quantize(w, spec, axis=axis, clip=clip)
