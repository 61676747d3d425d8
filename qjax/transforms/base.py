"""Quantization transforms: pure functions over parameter pytrees that compose like optax.

A `Transform` is a pair of pure functions, ``init(params) -> state`` and
``update(params, state, **extra) -> (new_params, state)``. ``extra`` carries what a
caller has: ``stats`` (calibration statistics keyed by '/'-joined parameter path) and,
inside the calibration runner, the block function and its inputs. Each transform
reads the keywords it knows and ignores the rest, so any transforms can be chained.
"""

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from qjax.core import is_qarray

Params = Any
State = Any
LeafStats = Mapping[str, Any]
Stats = Mapping[str, LeafStats]


class Transform(NamedTuple):
  """A quantization transform.

  Attributes:
    init: ``(params) -> state``.
    update: ``(params, state, **extra) -> (params, state)``.
    stats: names of the calibration statistics `update` reads from ``extra["stats"]``
      (e.g. ``{"hessian"}``); the calibration runner collects their union.
  """

  init: Callable[[Params], State]
  update: Callable[..., tuple[Params, State]]
  stats: frozenset[str] = frozenset()


class EmptyState(NamedTuple):
  """State of a stateless transform."""


class MaskedNode(NamedTuple):
  """Stands in for a leaf a masked transform must not see (as `optax.MaskedNode`)."""


CHAIN_MISMATCH_MSG = (
  "`chain` expected a state with one entry per transform, got {got} entries for {want} "
  "transforms; call init first with the same chain."
)


def path_str(path: tuple) -> str:
  """'/'-joined keys of a pytree key path, e.g. ``'model/layers/0/mlp/up_proj/kernel'``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def leaves_with_paths(params: Params) -> list[tuple[str, Any]]:
  """``(path, leaf)`` pairs, treating `QArray` as a leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
  return [(path_str(p), leaf) for p, leaf in flat]


def map_with_path(fn: Callable[[str, Any], Any], tree: Params, *rest: Params) -> Params:
  """`jax.tree.map` whose function also gets the leaf's '/'-joined path; QArrays are leaves."""
  return jax.tree_util.tree_map_with_path(
    lambda p, *xs: fn(path_str(p), *xs), tree, *rest, is_leaf=lambda x: is_qarray(x) or isinstance(x, MaskedNode)
  )


def stateless(update_fn: Callable[..., Params], *, stats: frozenset[str] = frozenset()) -> Transform:
  """A transform from ``update_fn(params, **extra) -> params``."""

  def update(params, state, **extra):
    return update_fn(params, **extra), state

  return Transform(lambda _: EmptyState(), update, frozenset(stats))


def per_leaf(quantize_leaf: Callable[[Any, LeafStats], Any], *, stats: frozenset[str] = frozenset()) -> Transform:
  """Lifts a function on one weight matrix to a transform over every visible leaf.

  Args:
    quantize_leaf: ``(w, leaf_stats) -> QArray | Array`` for one 2-D weight; it
      receives ``extra["stats"][path]`` (an empty mapping when absent).
    stats: the statistics `quantize_leaf` reads.

  Raises (from update):
    ValueError: naming every leaf that is not 2-D or is already quantized.
  """

  def update_fn(params, *, stats=None, **_):
    stats = stats or {}
    bad = [
      f"{path}: {'already a QArray' if is_qarray(w) else f'shape {np.shape(w)} is not 2-D'}"
      for path, w in leaves_with_paths(params)
      if not isinstance(w, MaskedNode) and (is_qarray(w) or np.ndim(w) != 2)
    ]
    if bad:
      raise ValueError("a per-leaf quantizer expected dense 2-D weights, got:\n  " + "\n  ".join(bad))

    def quantize(path, w):
      if isinstance(w, MaskedNode):
        return w
      try:
        return quantize_leaf(w, stats.get(path, {}))
      except ValueError as e:
        raise ValueError(f"{path}: {e}") from e

    return map_with_path(quantize, params)

  return stateless(update_fn, stats=stats)


def observe(inner: Transform, callback: Callable[[str, Any, Any], None]) -> Transform:
  """`inner`, calling ``callback(path, before, after)`` for every leaf it changed (e.g. to record errors)."""

  def update(params, state, **extra):
    new, state = inner.update(params, state, **extra)
    before = dict(leaves_with_paths(params))
    for path, after in leaves_with_paths(new):
      if path in before and after is not before[path] and not isinstance(after, MaskedNode):
        callback(path, before[path], after)
    return new, state

  return Transform(inner.init, update, inner.stats)


def identity() -> Transform:
  """Leaves params unchanged."""
  return stateless(lambda params, **_: params)


def chain(*transforms: Transform) -> Transform:
  """Applies transforms in order; the state is a tuple in member order.

  Examples:
    >>> t = chain(identity(), identity())
    >>> len(t.init({}))
    2
  """

  def init(params):
    return tuple(t.init(params) for t in transforms)

  def update(params, state, **extra):
    if len(state) != len(transforms):
      raise ValueError(CHAIN_MISMATCH_MSG.format(got=len(state), want=len(transforms)))
    new_state = []
    for t, s in zip(transforms, state, strict=True):
      params, s = t.update(params, s, **extra)
      new_state.append(s)
    return params, tuple(new_state)

  return Transform(init, update, frozenset().union(*(t.stats for t in transforms)))


def _resolve(tree_or_fn, params):
  return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


def _mask_tree(params, mask):
  return jax.tree.map(lambda m, p: p if m else MaskedNode(), mask, params, is_leaf=is_qarray)


def masked(inner: Transform, mask: Params | Callable[[Params], Params]) -> Transform:
  """Applies `inner` only to the leaves where `mask` is True.

  Args:
    inner: the transform to apply.
    mask: a pytree of bools with the structure of params (QArrays count as leaves),
      or a function ``params -> mask``.
  """

  def init(params):
    return inner.init(_mask_tree(params, _resolve(mask, params)))

  def update(params, state, **extra):
    mask_tree = _resolve(mask, params)
    new, state = inner.update(_mask_tree(params, mask_tree), state, **extra)
    merged = jax.tree.map(
      lambda m, p, n: n if m else p, mask_tree, params, new, is_leaf=lambda x: is_qarray(x) or isinstance(x, MaskedNode)
    )
    return merged, state

  return Transform(init, update, inner.stats)


def partition(transforms: Mapping[Hashable, Transform], labels: Params | Callable[[Params], Params]) -> Transform:
  """Applies ``transforms[label]`` to the leaves labelled `label`; a None label keeps a leaf as is.

  Args:
    transforms: label -> transform.
    labels: a pytree of labels with the structure of params, or ``params -> labels``.
  """

  def member_masks(params):
    label_tree = _resolve(labels, params)
    return {k: jax.tree.map(lambda lab, k=k: lab == k, label_tree, is_leaf=lambda x: x is None) for k in transforms}

  def init(params):
    masks = member_masks(params)
    return {k: masked(t, masks[k]).init(params) for k, t in transforms.items()}

  def update(params, state, **extra):
    masks = member_masks(params)
    new_state = {}
    for k, t in transforms.items():
      params, new_state[k] = masked(t, masks[k]).update(params, state[k], **extra)
    return params, new_state

  return Transform(init, update, frozenset().union(*(t.stats for t in transforms.values())))
