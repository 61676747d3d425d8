"""Quantization transforms: pure functions over parameter pytrees that compose like optax.

A `Transform` is a pair of pure functions, ``init(params) -> state`` and
``update(params, state, **extra) -> (new_params, state)``. ``extra`` carries what a
caller has: ``stats`` (calibration statistics keyed by '/'-joined parameter path), ``stats_owned``
(the paths whose statistics the caller hands over: a transform may donate their buffers) and,
inside the calibration runner, the block model, the block's prefix, function and inputs.
Each transform reads the keywords it knows and ignores the rest, so any transforms can be
chained.
"""

import functools
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from qjax.core import QSpec, is_qarray
from qjax.core.tree import MaskedNode, get_path, leaves_with_paths, map_with_path, replace_path

Params = Any
State = Any
LeafStats = Mapping[str, Any]
Stats = Mapping[str, LeafStats]


class Transform(NamedTuple):
  """A quantization transform.

  Attributes:
    init: ``(params) -> state``.
    update: ``(params, state, **extra) -> (params, state)``.
    stats: names of the calibration statistics `update` reads from ``extra["stats"]`` (e.g. ``{"hessian"}``;
      see `qjax.calib.stats.STATISTICS`); the calibration runner collects them just before it applies the
      transform.
    whole_block: `update` works on a whole decoder block at once (it rewrites several modules together, or runs
      the block itself: AWQ, SmoothQuant, learned clipping), so the runner applies it to the whole block, with
      every linear's statistics measured before it, and passes the block's function and inputs.
    members: the transforms this one composes (`chain`, `masked`, `partition`).
    sequential: the members run one after the other (`chain`): the runner applies them as separate stages, so
      each one's statistics are measured after the members before it ran.
  """

  init: Callable[[Params], State]
  update: Callable[..., tuple[Params, State]]
  stats: frozenset[str] = frozenset()
  whole_block: bool = False
  members: tuple["Transform", ...] = ()
  sequential: bool = False


class EmptyState(NamedTuple):
  """State of a stateless transform."""


CHAIN_MISMATCH_MSG = (
  "`chain` expected a state with one entry per transform, got {got} entries for {want} "
  "transforms; call init first with the same chain."
)


def stateless(
  update_fn: Callable[..., Params], *, stats: frozenset[str] = frozenset(), whole_block: bool = False
) -> Transform:
  """A transform from ``update_fn(params, **extra) -> params``."""

  def update(params, state, **extra):
    return update_fn(params, **extra), state

  return Transform(lambda _: EmptyState(), update, frozenset(stats), whole_block)


def each_matrix(fn: Callable[..., Any], w, *args, **static) -> Any:
  """``fn(w, *args, **static)`` on a kernel (in, out), or on each matrix of a mixture of experts' stack of kernels
  (E, in, out), with `args` stacked alike along their first axis (`jax.vmap`); `static` is passed as it is. So the
  math stays written for one matrix."""
  one = functools.partial(fn, **static)
  return jax.vmap(one)(w, *args) if np.ndim(w) == 3 else one(w, *args)


def per_leaf(
  quantize_leaf: Callable[..., Any],
  *,
  stats: frozenset[str] = frozenset(),
  spec: QSpec | None = None,
  consumes_stats: bool = False,
) -> Transform:
  """Lifts a function on one weight matrix to a transform over every visible leaf.

  A 3-D leaf is a mixture of experts' stack of kernels (E, in, out): each expert is quantized on its own, with its
  own statistics (a leading expert axis in each), into one spec, and the results stacked (a stacked `QArray`), so
  every expert of a layer ends in the same scheme.

  Args:
    quantize_leaf: ``(w, leaf_stats) -> QArray | Array`` for one 2-D weight; it receives ``extra["stats"][path]``
      (an empty mapping when absent). With `spec`: ``(w, leaf_stats, spec) -> ...``.
    stats: the statistics `quantize_leaf` reads.
    spec: the spec `quantize_leaf` rounds into, when it has a per-tensor parameter to fix (a
      `qjax.core.grid.TensorGrid`: NVFP4's global scale, a `PerTensorGrid`'s scale): it is fixed from the largest
      magnitude of the leaf and of its fused siblings, the visible leaves of the same parent module with the same
      input width (q/k/v, gate/up: runtimes such as vLLM run them as one matrix with one such parameter, and
      rescale to the largest when they differ).
    consumes_stats: `quantize_leaf` also takes ``owned=``: True for a 2-D leaf whose statistics the caller handed
      over (``extra["stats_owned"]``, paths whose arrays no other path shares: the calibration runner's), so it
      may donate their buffers (GPTQ its Hessian, 0.8 GB for a 14336-wide input).

  Raises (from update):
    ValueError: naming every leaf that is not 2-D (or 3-D, experts) or is already quantized.
  """

  def quantize_one(w, leaf_stats, leaf_spec, owned=False):
    args = (w, leaf_stats) if leaf_spec is None else (w, leaf_stats, leaf_spec)
    return quantize_leaf(*args, owned=owned) if consumes_stats else quantize_leaf(*args)

  def quantize_experts(w, leaf_stats, leaf_spec):
    parts = [
      quantize_one(w[e], {name: value[e] for name, value in leaf_stats.items()}, leaf_spec) for e in range(w.shape[0])
    ]
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *parts)

  def update_fn(params, *, stats=None, stats_owned=frozenset(), **_):
    stats = stats or {}
    leaves = [(path, w) for path, w in leaves_with_paths(params) if not isinstance(w, MaskedNode)]
    bad = [
      f"{path}: {'already a QArray' if is_qarray(w) else f'shape {np.shape(w)} is not 2-D'}"
      for path, w in leaves
      if is_qarray(w) or np.ndim(w) not in (2, 3)
    ]
    if bad:
      raise ValueError("a per-leaf quantizer expected dense 2-D weights, got:\n  " + "\n  ".join(bad))
    specs = None if spec is None else fused_specs(spec, dict(leaves))

    def quantize(path, w):
      if isinstance(w, MaskedNode):
        return w
      leaf_spec = None if specs is None else specs[path]
      try:
        if np.ndim(w) == 3:
          return quantize_experts(w, stats.get(path, {}), leaf_spec)
        return quantize_one(w, stats.get(path, {}), leaf_spec, owned=path in stats_owned)
      except ValueError as e:
        raise ValueError(f"{path}: {e}") from e

    return map_with_path(quantize, params)

  return stateless(update_fn, stats=stats)


def fused_specs(spec: QSpec, leaves: Mapping[str, Any]) -> dict[str, QSpec]:
  """`spec` for each of `leaves` ((in, out) kernels by path), its per-tensor parameter fixed jointly for siblings:
  kernels ``parent/name/kernel`` of one parent with one input width (`per_leaf`). Without such a parameter, `spec`
  for every leaf."""
  if not spec.needs_tensor_fit:
    return dict.fromkeys(leaves, spec)
  sets: dict[tuple[str, int], list[str]] = {}
  for path, w in leaves.items():
    parent = path.rsplit("/", 2)[0] if path.count("/") >= 2 else ""
    sets.setdefault((parent, np.shape(w)[-2]), []).append(path)
  specs = {}
  for paths in sets.values():
    amax = max(float(np.max(np.abs(np.asarray(leaves[p], np.float32)))) for p in paths)
    specs.update(dict.fromkeys(paths, spec.for_tensor(amax)))
  return specs


OUTSIDE_RUNNER_MSG = (
  "{name} runs inside the calibration runner, one decoder block at a time, which passes the block ({missing}); "
  "apply it with `qjax.calib.quantize_model` (or `quantize_blocks`), not `quantize_params`."
)


def per_block(
  update_block: Callable[..., Params], *, stats: frozenset[str] = frozenset(), name: str = "a block transform"
) -> Transform:
  """Lifts a function on one decoder block to a transform the calibration runner applies to each block.

  Args:
    update_block: ``(block, *, stats, block_model, block_prefix, block_inputs, block_fn) -> block`` on the
      block's params (paths relative to the block, e.g. ``mlp/up_proj/kernel``); ``stats`` holds the statistics
      it names, keyed by relative kernel path; ``block_model`` says where the block's scale groups are,
      ``block_fn`` and ``block_inputs`` run it.
    stats: the statistics `update_block` reads (measured on the block before it runs).
    name: for the error raised outside the runner.

  Raises (from update):
    ValueError: outside the calibration runner.
  """

  def update_fn(params, *, block_prefix=None, stats=None, block_model=None, **extra):
    if block_prefix is None or block_model is None:
      raise ValueError(OUTSIDE_RUNNER_MSG.format(name=name, missing="block_prefix, block_model"))
    prefix = f"{block_prefix}/"
    local = {k.removeprefix(prefix): v for k, v in (stats or {}).items() if k.startswith(prefix)}
    block = get_path(params, block_prefix)
    block = update_block(block, stats=local, block_model=block_model, block_prefix=block_prefix, **extra)
    return replace_path(params, block_prefix, jax.device_get(block))

  return stateless(update_fn, stats=frozenset(stats), whole_block=True)


def observe(inner: Transform, callback: Callable[[str, Any, Any], None]) -> Transform:
  """`inner`, calling ``callback(path, before, after)`` for every leaf it changed (e.g. to record errors)."""

  def update(params, state, **extra):
    new, state = inner.update(params, state, **extra)
    before = dict(leaves_with_paths(params))
    for path, after in leaves_with_paths(new):
      if path in before and after is not before[path] and not isinstance(after, MaskedNode):
        callback(path, before[path], after)
    return new, state

  if inner.sequential:  # observe each stage, so the runner can still run them one by one
    return chain(*(observe(t, callback) for t in inner.members))
  return inner._replace(update=update)


def chain(*transforms: Transform) -> Transform:
  """Applies transforms in order; the state is a tuple in member order.

  The calibration runner runs a chain as its members, one stage each, so that a member's statistics are
  measured after the members before it changed the block (``chain(awq(...), gptq_rules)`` as one stage equals
  the two stages in a list).

  Examples:
    >>> from qjax.transforms.methods import rtn
    >>> from qjax.core import QSpec
    >>> t = chain(rtn(QSpec(bits=4, group_size=32)), rtn(QSpec(bits=8, group_size=32)))
    >>> len(t.init({})), t.sequential
    (2, True)
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

  stats = frozenset().union(*(t.stats for t in transforms))
  whole_block = any(t.whole_block for t in transforms)
  return Transform(init, update, stats, whole_block, tuple(transforms), sequential=True)


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

  return Transform(init, update, inner.stats, inner.whole_block, (inner,))


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

  members = tuple(transforms.values())
  stats = frozenset().union(*(t.stats for t in members))
  return Transform(init, update, stats, any(t.whole_block for t in members), members)


NESTED_CHAIN_MSG = (
  "a chain inside {where} cannot run as one calibration stage: its member {index} reads statistics ({stats}) that "
  "the runner would measure before the members ahead of it ran. Chain at the top level (the runner runs a chain's "
  "members one by one), or pass the members as separate stages."
)


def flatten_stages(stages: tuple[Transform, ...] | list[Transform]) -> list[Transform]:
  """The stages a runner applies one by one: chains expanded into their members, in order.

  Raises:
    ValueError: for a chain nested in a `masked` or `partition` whose later members read statistics or run the
      block (they would see statistics measured too early).
  """
  flat = []
  for stage in stages:
    if stage.sequential:
      flat.extend(flatten_stages(stage.members))
    else:
      _check_nested(stage, "a masked or partition transform")
      flat.append(stage)
  return flat


def _check_nested(t: Transform, where: str) -> None:
  for member in t.members:
    if member.sequential:
      for i, inner in enumerate(member.members[1:], 1):
        if inner.stats or inner.whole_block:
          raise ValueError(NESTED_CHAIN_MSG.format(where=where, index=i, stats=", ".join(sorted(inner.stats))))
    _check_nested(member, where)
