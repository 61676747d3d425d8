"""Bits allocated to a budget: which format each tensor takes so the predicted error is least within the bits.

Each `Unit` is a set of tensors that must share one format (a fused q/k/v for a GPU kernel, a lone tensor in a GGUF
file) and its `Option`s: a format, the bits it costs the unit and the error it is predicted to add. Errors are
assumed additive over units (true to second order for a KL divergence whose curvature is block diagonal over
tensors), which makes the allocation a multiple-choice knapsack. `allocate` solves it as a Lagrangian does:
every unit walks up the lower convex hull of its (bits, error) options, the steps taken in order of error removed
per bit until the budget is spent, then the bits left over buy the best affordable step off the hull.
"""

from collections.abc import Sequence
from typing import NamedTuple


class Option(NamedTuple):
  """One way to store a unit: ``label`` (a ggml type, a bit width) at ``bits`` total, adding ``error``."""

  label: str
  bits: float
  error: float


class Unit(NamedTuple):
  """Tensors that take one option together (``members``: their paths), and the options they may take."""

  members: tuple[str, ...]
  options: tuple[Option, ...]


def _hull(options: Sequence[Option]) -> list[int]:
  """Indices of the options on the lower convex hull of (bits, error), by increasing bits: the options a
  Lagrangian (error + λ·bits) picks for some λ, each removing less error per bit than the one before."""
  order = sorted(range(len(options)), key=lambda i: (options[i].bits, options[i].error))
  hull: list[int] = []
  for i in order:
    if hull and options[i].error >= options[hull[-1]].error:
      continue  # more bits, no less error: never chosen
    while len(hull) >= 2:
      a, b = options[hull[-2]], options[hull[-1]]
      c = options[i]
      # b lies on or above the segment a-c: dropping it loses nothing on the hull
      if (b.error - a.error) * (c.bits - a.bits) >= (c.error - a.error) * (b.bits - a.bits):
        hull.pop()
      else:
        break
    hull.append(i)
  return hull


def allocate(units: Sequence[Unit], budget_bits: float) -> list[int]:
  """The option each unit takes, least total error with total bits at most `budget_bits`.

  Args:
    units: the units, each with at least one option.
    budget_bits: bits the units may use together.

  Returns:
    For each unit, the index of its chosen option in ``unit.options``.

  Raises:
    ValueError: if even the cheapest option of every unit exceeds the budget (naming both totals).

  Examples:
    >>> u = [Unit(("a",), (Option("4", 4.0, 1.0), Option("8", 8.0, 0.1))),
    ...      Unit(("b",), (Option("4", 4.0, 5.0), Option("8", 8.0, 0.2)))]
    >>> allocate(u, 12.0)   # the 4 bits go where they remove most error
    [0, 1]
  """
  hulls = [_hull(u.options) for u in units]
  at = [0] * len(units)  # position along each unit's hull
  spent = sum(u.options[h[0]].bits for u, h in zip(units, hulls, strict=True))
  if spent > budget_bits:
    raise ValueError(f"the budget of {budget_bits:.0f} bits is below the {spent:.0f} bits of the cheapest formats.")
  steps = []  # (error removed per bit, unit, hull position the step reaches); slopes fall along a hull
  for k, (u, h) in enumerate(zip(units, hulls, strict=True)):
    for j in range(1, len(h)):
      a, b = u.options[h[j - 1]], u.options[h[j]]
      steps.append(((a.error - b.error) / (b.bits - a.bits), k, j))
  # Steps of one unit come in hull order because their slopes fall; ties keep that order through the stable sort.
  steps.sort(key=lambda s: -s[0])
  for _, k, j in steps:
    if at[k] != j - 1:
      continue  # an earlier step of this unit did not fit: the later ones build on it
    h, u = hulls[k], units[k]
    extra = u.options[h[j]].bits - u.options[h[j - 1]].bits
    if spent + extra <= budget_bits:
      at[k], spent = j, spent + extra
  chosen = [h[j] for h, j in zip(hulls, at, strict=True)]
  # What the hull walk leaves unspent buys, one at a time, the step (any option, on the hull or not) that removes
  # the most error and still fits.
  while True:
    best = None
    for k, u in enumerate(units):
      now = u.options[chosen[k]]
      for i, o in enumerate(u.options):
        gain, extra = now.error - o.error, o.bits - now.bits
        if gain > 0 and spent + extra <= budget_bits and (best is None or gain > best[0]):
          best = (gain, k, i, extra)
    if best is None:
      return chosen
    _, k, i, extra = best
    chosen[k], spent = i, spent + extra
