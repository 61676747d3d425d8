"""Transforms for the quantization methods: the glue between a method's core and param trees."""

import numpy as np
from jax.sharding import Mesh

from qjax.core import ClipSearch, QSpec
from qjax.quantizers.gptq import GptqConfig, gptq_quantize
from qjax.quantizers.kquants import kquant_quantize
from qjax.quantizers.rtn import rtn_quantize
from qjax.transforms.base import Transform, per_leaf

MISSING_HESSIAN_MSG = (
  "`gptq` expected calibration statistic 'hessian' (the (in, in) XᵀX of the layer's inputs) for the {shape} "
  "weight, got statistics {got}. Run calibration with this transform (its `stats` names what to collect), "
  "or exclude the leaf from the `gptq` rule."
)


def rtn(spec: QSpec, *, clip: ClipSearch | None = None) -> Transform:
  """Round-to-nearest on every visible 2-D leaf (Flax kernels, contraction axis 0).

  Examples:
    >>> import numpy as np
    >>> t = rtn(QSpec(bits=4, group_size=32))
    >>> q, _ = t.update({"kernel": np.ones((32, 4), np.float32)}, t.init(None))
    >>> q["kernel"].spec.bits
    4
  """
  return per_leaf(lambda w, _, spec: rtn_quantize(w, spec=spec, clip=clip), spec=spec)


def gptq(spec: QSpec, config: GptqConfig = GptqConfig(), *, mesh: Mesh | None = None) -> Transform:
  """GPTQ on every visible 2-D leaf, with the leaf's ``"hessian"`` statistic (see `gptq_quantize`).

  With `mesh` (by default the calibration runner's, which it passes to each stage as ``mesh=``), each weight's
  output channels are split over all of its devices for the sweep (weights whose output width does not divide
  evenly run on one device).

  Raises (from update):
    ValueError: for a leaf without a ``"hessian"`` statistic, or whose Hessian stays
      non-positive-definite after dampening.

  Examples:
    >>> import numpy as np
    >>> t = gptq(QSpec(bits=4, group_size=32))
    >>> stats = {"kernel": {"hessian": np.eye(32, dtype=np.float32)}}
    >>> q, _ = t.update({"kernel": np.ones((32, 4), np.float32)}, t.init(None), stats=stats)
    >>> sorted(t.stats), q["kernel"].spec.bits
    (['hessian'], 4)
  """

  own = mesh  # the update's `mesh` keyword is the runner's

  def on(devices: Mesh | None) -> Transform:
    def quantize_leaf(w, leaf_stats, spec, owned):
      if "hessian" not in leaf_stats:
        raise ValueError(MISSING_HESSIAN_MSG.format(shape=np.shape(w), got=sorted(leaf_stats)))
      split = devices if devices is not None and np.shape(w)[1] % devices.size == 0 else None
      q, _ = gptq_quantize(w, leaf_stats["hessian"], spec=spec, config=config, mesh=split, donate_hessian=owned)
      return q

    return per_leaf(quantize_leaf, stats=frozenset({"hessian"}), spec=spec, consumes_stats=True)

  def update(params, state, *, mesh: Mesh | None = None, **extra):
    return on(own if own is not None else mesh).update(params, state, **extra)

  return on(own)._replace(update=update)


MISSING_IMATRIX_MSG = (
  "`kquant` with imatrix=True expected calibration statistic 'imatrix' (mean x² of the layer's inputs) for the "
  "{shape} weight, got statistics {got}; run it through the calibration runner, or use imatrix=False."
)


def kquant(type_name: str, *, axis: int = 0, imatrix: bool = False) -> Transform:
  """llama.cpp's block quantization to `type_name` on every visible leaf (see `kquant_quantize`).

  Args:
    type_name: a ggml block type (``"Q4_K"``, ``"Q8_0"`` …).
    axis: contraction axis of the leaves: 0 for Dense kernels, 1 for an embedding table.
    imatrix: weight the block searches by the leaf's ``"imatrix"`` statistic (llama.cpp's
      importance matrix); the transform then asks the calibration runner for it.
  """

  def quantize_leaf(w, leaf_stats):
    if imatrix and "imatrix" not in leaf_stats:
      raise ValueError(MISSING_IMATRIX_MSG.format(shape=np.shape(w), got=sorted(leaf_stats)))
    return kquant_quantize(w, type_name=type_name, imatrix=leaf_stats.get("imatrix") if imatrix else None, axis=axis)

  return per_leaf(quantize_leaf, stats=frozenset({"imatrix"}) if imatrix else frozenset())
