"""Equivalence transforms: reparametrisations that leave the float model's function unchanged.

Rounding loses less when the weights are better conditioned, and two families of exact rewrites help:

* per-channel scaling (AWQ, SmoothQuant): the linears reading one input have input channel ``j`` multiplied by
  ``s_j`` and the operation producing that input (a norm's weight, or a linear's output channels) divided by it;
  a `ScaleGroup` names the producer and the readers;
* rotations of the residual stream (QuaRot's R1): with an orthogonal ``R``, the stream becomes ``x R``: the
  embedding is ``E R``, every linear reading the stream first absorbs the RMSNorm weight before it
  (``RMSNorm(x R) = RMSNorm(x) R`` only for a unit norm weight) and becomes ``Rᵀ W``, every linear writing to it
  becomes ``W R``. A `ResidualStream` names where a part of the model touches the stream.

A model says where its groups and its stream are (`qjax.models.blocks.LlamaBlocks.scale_groups`,
``residual_stream``); the folding here is model-agnostic. Paths are '/'-joined, relative to the tree given.
"""

import functools
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from jaxtyping import Array, Float

from qjax.core.tree import get_path, replace_path
from qjax.quantizers.rotation import random_rotation
from qjax.transforms.base import Transform, stateless


class ScaleGroup(NamedTuple):
  """Linears that read one input, and where a per-channel scaling of that input is folded and measured.

  Attributes:
    prev: path of the module producing the input: a norm, whose ``scale`` absorbs ``1/s``, or a linear, whose
      output channels absorb it.
    linears: paths of the linears reading that input (and quantized).
    inspect: path of the module whose output measures a scaling's error (e.g. the attention).
    float_readers: paths of linears that read the input too but stay in float (a mixture of experts' router):
      they absorb ``s`` exactly, so the function is unchanged, and the search leaves them out of its rounding.

  A group whose `prev` is a stack of expert linears (E, in, out) feeding another stack scales each expert by its
  own ``s`` (E, width): each expert's output channels, and the next stack's input rows of that expert.
  """

  prev: str
  linears: tuple[str, ...]
  inspect: str
  float_readers: tuple[str, ...] = ()


def input_rows(s: Float[Array, "*experts in"], ndim: int) -> Array:
  """`s` shaped (..., in, 1) to multiply the input rows of a kernel of `ndim` dims (..., in, out): shared by a stack's
  experts when 1-D."""
  return s.reshape((1,) * (ndim - s.ndim - 1) + (*s.shape, 1))


def fold_scales(tree, group: ScaleGroup, s: Float[Array, "*experts in"]):
  """Multiplies the group's kernel rows (input channels) by `s` and divides the producer's output by it.

  Kernels may be stacks of experts (E, in, out): `s` (in,) then scales every expert alike, and `s` (E, in) each
  expert by its own row.

  Examples:
    >>> import numpy as np
    >>> tree = {"norm": {"scale": np.ones(2, np.float32)}, "fc": {"kernel": np.ones((2, 3), np.float32)}}
    >>> out = fold_scales(tree, ScaleGroup("norm", ("fc",), "fc"), np.asarray([2.0, 4.0], np.float32))
    >>> out["norm"]["scale"].tolist(), out["fc"]["kernel"][:, 0].tolist()
    ([0.5, 0.25], [2.0, 4.0])
  """
  for linear in (*group.linears, *group.float_readers):
    kernel = get_path(tree, f"{linear}/kernel")
    tree = replace_path(tree, f"{linear}/kernel", (kernel * input_rows(s, np.ndim(kernel))).astype(kernel.dtype))
  producer = get_path(tree, group.prev)
  if "scale" in producer:  # a norm
    tree = replace_path(tree, f"{group.prev}/scale", (producer["scale"] / s).astype(producer["scale"].dtype))
  else:  # a linear: its output channels
    kernel = producer["kernel"]
    tree = replace_path(tree, f"{group.prev}/kernel", (kernel / s[..., None, :]).astype(kernel.dtype))
    if "bias" in producer:
      tree = replace_path(tree, f"{group.prev}/bias", (producer["bias"] / s).astype(producer["bias"].dtype))
  return tree


class ResidualStream(NamedTuple):
  """Where a part of a model touches the residual stream.

  Attributes:
    readers: norm module path -> the linear module paths that read the norm's output.
    writers: linear module paths whose output is added to the stream.
    embeddings: embedding table paths ``(vocab, hidden)``, whose rows are stream vectors.
  """

  readers: Mapping[str, tuple[str, ...]] = {}
  writers: tuple[str, ...] = ()
  embeddings: tuple[str, ...] = ()


def _cast(x: np.ndarray, like) -> np.ndarray:
  return np.ascontiguousarray(x).astype(np.asarray(like).dtype)


def rotate_stream(tree, stream: ResidualStream, r: Float[np.ndarray, "d d"]):
  """`tree` with the rotation `r` folded in where `stream` says (in float64, cast back); norms become 1.

  Args:
    tree: nested dicts of params holding the paths `stream` names.
    stream: where the tree touches the residual stream.
    r: (d, d) orthogonal matrix.
  """
  for norm, readers in stream.readers.items():
    gamma = np.asarray(get_path(tree, f"{norm}/scale"), np.float64)
    for m in readers:
      kernel = get_path(tree, f"{m}/kernel")
      rotated = r.T @ (gamma[:, None] * np.asarray(kernel, np.float64))
      tree = replace_path(tree, f"{m}/kernel", _cast(rotated, kernel))
    scale = get_path(tree, f"{norm}/scale")
    tree = replace_path(tree, f"{norm}/scale", np.ones(np.shape(scale), np.asarray(scale).dtype))
  for m in stream.writers:
    node = get_path(tree, m)
    tree = replace_path(tree, f"{m}/kernel", _cast(np.asarray(node["kernel"], np.float64) @ r, node["kernel"]))
    if "bias" in node:
      tree = replace_path(tree, f"{m}/bias", _cast(np.asarray(node["bias"], np.float64) @ r, node["bias"]))
  for path in stream.embeddings:
    e = get_path(tree, path)
    tree = replace_path(tree, path, _cast(np.asarray(e, np.float64) @ r, e))
  return tree


def _width(tree, stream: ResidualStream) -> int:
  if stream.readers:
    return int(np.shape(get_path(tree, f"{next(iter(stream.readers))}/scale"))[0])
  if stream.embeddings:
    return int(np.shape(get_path(tree, stream.embeddings[0]))[1])
  return int(np.shape(get_path(tree, f"{stream.writers[0]}/kernel"))[1])


NO_STREAM_MSG = (
  "`rotate` needs the model to say where its parts touch the residual stream: it runs inside the calibration "
  "runner, which passes `block_model` (with a `residual_stream` method); got {got}."
)


def rotate(*, seed: int = 0) -> Transform:
  """A randomized Hadamard rotation of the residual stream folded into the weights (QuaRot's R1).

  Applied to every part of the model (embedding, each block, head), it leaves the float model's function
  unchanged and spreads weight outliers over all channels; a tied output embedding is untied, since the head
  now differs from the embedding. Chain a rounding after it.

  Args:
    seed: seed of the random signs (and of the rotation for widths with no Hadamard matrix).

  References:
    Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024 (arXiv:2404.00456).
  """

  def update_fn(params, *, block_model=None, **_):
    if block_model is None or not hasattr(block_model, "residual_stream"):
      raise ValueError(NO_STREAM_MSG.format(got=type(block_model).__name__))
    stream = block_model.residual_stream(params)
    if not (stream.readers or stream.writers or stream.embeddings):
      return params
    return rotate_stream(params, stream, _rotation(_width(params, stream), seed))

  return stateless(update_fn)


@functools.lru_cache(maxsize=4)
def _rotation(n: int, seed: int) -> np.ndarray:
  return random_rotation(n, seed=seed)
