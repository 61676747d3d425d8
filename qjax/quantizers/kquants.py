"""llama.cpp's per-tensor quantization (``llama-quantize``): a weight matrix to ggml blocks, byte for byte.

llama.cpp rounds each block on its own with a weighted least-squares search of its scales (see
`qjax.core.ggml_kquants.encode`, which holds the encoders); this module applies it to a Flax weight.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from qjax.core import QArray, QSpec
from qjax.core.ggml_kquants import encode


def kquant_quantize(
  w: Float[Array, "in out"], *, type_name: str, imatrix: Float[Array, " in"] | None = None, axis: int = 0
) -> QArray:
  """Quantizes a weight matrix to a ggml block type, as llama.cpp's ``llama-quantize`` does per tensor.

  Minimises, per block, llama.cpp's weighted squared error ``sum_i w_i (x_i - q(x_i))^2`` by its own searches
  (see `encode`); the result's codes are the GGUF block bytes themselves.

  Args:
    w: (in, out) Flax Dense kernel (``axis=0``: ggml rows are output channels, blocks run along `in`), or an
      (vocab, hidden) embedding (``axis=1``: rows are the vocabulary). float32|bfloat16|float16.
    type_name: a ggml block type (see `encode`).
    imatrix: optional importance of each contraction-axis entry, shape (w.shape[axis],).
    axis: the contraction axis, along which blocks run.

  Returns:
    A `QArray` with ``spec = QSpec.ggml(type_name)``, codes (out, in / block_size * type_size) uint8, and the
    shape and dtype of `w`.

  Raises:
    ValueError: as `encode`, or for `axis` not in (0, 1).

  References:
    llama.cpp ``src/llama-quant.cpp`` ``llama_tensor_quantize_impl`` (rows of ``ne[0]`` elements).

  Examples:
    >>> import numpy as np
    >>> from qjax.core import dequantize
    >>> w = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    >>> q = kquant_quantize(w, type_name="Q6_K")
    >>> q.codes.shape, bool(np.abs(np.asarray(dequantize(q)) - w).max() < 0.1)
    ((8, 210), True)
  """
  if axis not in (0, 1):
    raise ValueError(f"`kquant_quantize` expected axis in (0, 1), got {axis=}.")
  w = w if isinstance(w, np.ndarray) else jnp.asarray(w)  # a host matrix is encoded without a device copy of it whole
  rows = w.T if axis == 0 else w
  codes = encode(rows, type_name, imatrix)
  return QArray(
    codes=codes,
    scale=None,
    zero=None,
    perm=None,
    spec=QSpec.ggml(type_name),
    shape=tuple(w.shape),
    dtype=np.dtype(w.dtype),
    axis=axis,
  )
