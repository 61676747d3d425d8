"""Rules: which parameters get which transform, chosen by regex on their paths.

A rule's pattern is matched with `re.fullmatch` against the leaf's '/'-joined path
(e.g. ``model/layers/3/self_attn/q_proj/kernel``); the first matching rule wins. A rule
whose transform is None keeps the matched leaves dense, which is how exceptions are
written ahead of a catch-all.
"""

import dataclasses
import re
import warnings
from collections.abc import Sequence

import jax
import numpy as np

from qjax.core import is_qarray
from qjax.core.tree import leaves_with_paths, map_with_path
from qjax.transforms.base import Params, Transform, partition


@dataclasses.dataclass(frozen=True)
class Rule:
  """Apply `transform` to every leaf whose path fully matches `pattern`.

  Attributes:
    pattern: regular expression, matched with `re.fullmatch` on '/'-joined paths.
    transform: the transform for matched leaves; None keeps them dense.
    name: a label for reports (the pattern if empty).
  """

  pattern: str
  transform: Transform | None
  name: str = ""

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"`Rule` expected a valid regular expression, got {self.pattern!r}: {e}.") from e

  @property
  def label(self) -> str:
    return self.name or self.pattern


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  path: str
  shape: tuple[int, ...]
  dtype: str
  rule: int | None  # index into the rules, or None when no rule matched


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `quantize_params` would do (a dry run).

  Attributes:
    rules: the rules, in priority order.
    leaves: one entry per parameter leaf, in tree order.
  """

  rules: tuple[Rule, ...]
  leaves: tuple[LeafPlan, ...]

  @property
  def unused_rules(self) -> tuple[Rule, ...]:
    """Rules that matched no leaf (usually a typo in the pattern)."""
    used = {leaf.rule for leaf in self.leaves}
    return tuple(r for i, r in enumerate(self.rules) if i not in used)

  def assignment(self) -> dict[str, str | None]:
    """path -> label of the rule that matched it (None if none did)."""
    return {leaf.path: None if leaf.rule is None else self.rules[leaf.rule].label for leaf in self.leaves}

  def __str__(self) -> str:
    lines = [f"{'parameter':60s} {'shape':>16s} {'dtype':>9s}  rule"]
    for leaf in self.leaves:
      rule = "-" if leaf.rule is None else self.rules[leaf.rule].label
      if leaf.rule is not None and self.rules[leaf.rule].transform is None:
        rule += " (kept dense)"
      lines.append(f"{leaf.path:60s} {leaf.shape!s:>16s} {leaf.dtype:>9s}  {rule}")
    for rule in self.unused_rules:
      lines.append(f"warning: rule {rule.label!r} matched no parameter")
    return "\n".join(lines)


def _as_rules(rules: Sequence[Rule | tuple[str, Transform | None]]) -> tuple[Rule, ...]:
  return tuple(r if isinstance(r, Rule) else Rule(*r) for r in rules)


def _match(path: str, rules: tuple[Rule, ...]) -> int | None:
  return next((i for i, r in enumerate(rules) if re.fullmatch(r.pattern, path)), None)


def plan(params: Params, rules: Sequence[Rule | tuple[str, Transform | None]]) -> Plan:
  """Dry run: which rule each leaf gets, and which rules are unused. Params may be abstract.

  Examples:
    >>> import numpy as np
    >>> p = plan({"dense": {"kernel": np.zeros((4, 4))}}, [(".*/kernel", None), ("typo", None)])
    >>> p.assignment(), [r.pattern for r in p.unused_rules]
    ({'dense/kernel': '.*/kernel'}, ['typo'])
  """
  rules = _as_rules(rules)
  leaves = []
  for path, leaf in leaves_with_paths(params):
    shape = tuple(leaf.shape)
    dtype = f"Q:{leaf.spec.layout}" if is_qarray(leaf) else str(np.dtype(leaf.dtype))
    leaves.append(LeafPlan(path, shape, dtype, _match(path, rules)))
  return Plan(rules, tuple(leaves))


def labels_fn(rules: Sequence[Rule | tuple[str, Transform | None]]):
  """Compiles rules into ``params -> labels`` for `partition` (label = rule index or None)."""
  rules = _as_rules(rules)

  def labels(params):
    def label(path, _):
      i = _match(path, rules)
      return None if i is None or rules[i].transform is None else i

    return map_with_path(label, params)

  return labels


def rules_transform(rules: Sequence[Rule | tuple[str, Transform | None]]) -> Transform:
  """The `partition` transform that applies each rule's transform to the leaves it matched."""
  rules = _as_rules(rules)
  members = {i: r.transform for i, r in enumerate(rules) if r.transform is not None}
  return partition(members, labels_fn(rules))


def _check_finite(params: Params, the_plan: Plan) -> None:
  selected = {leaf.path for leaf in the_plan.leaves if leaf.rule is not None and the_plan.rules[leaf.rule].transform}
  bad = []
  for path, leaf in leaves_with_paths(params):
    if path in selected and not is_qarray(leaf) and not isinstance(leaf, jax.core.Tracer):
      values = np.asarray(leaf, np.float32)
      if not np.isfinite(values).all():
        bad.append(f"{path}: {int(np.isnan(values).sum())} NaN, {int(np.isinf(values).sum())} Inf")
  if bad:
    raise ValueError("`quantize_params` expected finite weights, got:\n  " + "\n  ".join(bad))


def quantize_params(params: Params, rules: Sequence[Rule | tuple[str, Transform | None]], **extra) -> Params:
  """Applies the rules' transforms to a parameter tree; unmatched leaves stay dense.

  Args:
    params: a parameter pytree (Flax ``params``); leaves are arrays or `QArray`s.
    rules: `Rule`s or ``(pattern, transform)`` pairs, in priority order.
    **extra: passed to each transform's update (e.g. ``stats=``).

  Returns:
    The same tree with matched leaves replaced by what their transforms returned
    (usually `QArray`s).

  Raises:
    ValueError: naming every selected leaf that holds NaN or Inf.

  Warns:
    UserWarning: for rules that match no parameter.

  Examples:
    >>> import numpy as np
    >>> from qjax.core import QSpec
    >>> from qjax.transforms.methods import rtn
    >>> params = {"mlp": {"kernel": np.ones((64, 8), np.float32), "bias": np.zeros(8, np.float32)}}
    >>> q = quantize_params(params, [(".*/kernel", rtn(QSpec(bits=4, group_size=32)))])
    >>> type(q["mlp"]["kernel"]).__name__, q["mlp"]["bias"].shape
    ('QArray', (8,))
  """
  the_plan = plan(params, rules)
  for rule in the_plan.unused_rules:
    warnings.warn(f"`quantize_params`: rule {rule.label!r} matched no parameter.", stacklevel=2)
  _check_finite(params, the_plan)
  transform = rules_transform(the_plan.rules)
  new_params, _ = transform.update(params, transform.init(params), **extra)
  return new_params
