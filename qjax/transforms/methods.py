"""Transforms for the quantization methods: the glue between a method's core and param trees."""

from qjax.core import ClipSearch, QSpec
from qjax.quantizers.rtn import rtn_quantize
from qjax.transforms.base import Transform, per_leaf


def rtn(spec: QSpec, *, clip: ClipSearch | None = None) -> Transform:
  """Round-to-nearest on every visible 2-D leaf (Flax kernels, contraction axis 0).

  Examples:
    >>> import numpy as np
    >>> t = rtn(QSpec(bits=4, group_size=32))
    >>> q, _ = t.update({"kernel": np.ones((32, 4), np.float32)}, t.init(None))
    >>> q["kernel"].spec.bits
    4
  """
  return per_leaf(lambda w, _: rtn_quantize(w, spec=spec, clip=clip))
