"""The bit allocation's solver against brute force: within the budget, and as good as the best assignment."""

import numpy as np
import pytest

from qjax.transforms.allocation import Option, Unit, allocate


def _random_units(rng, n_units: int, n_options: int) -> list[Unit]:
  """Units whose error falls with bits roughly as 2^-2b (rounding error's law), each with its own sensitivity."""
  units = []
  for k in range(n_units):
    sensitivity, size = rng.lognormal(0, 1.5), int(rng.integers(1, 5))
    bits = sorted(rng.choice(np.arange(2, 9), n_options, replace=False))
    noise = rng.uniform(0.7, 1.3, n_options)
    options = tuple(Option(str(b), float(b * size), float(sensitivity * size * 4.0**-b * e))
                    for b, e in zip(bits, noise, strict=True))  # fmt: skip
    units.append(Unit((f"t{k}",), options))
  return units


def _optimum(units: list[Unit], budget: float) -> float:
  """The least total error within `budget`, by dynamic programming over integer bits (exact here)."""
  limit = int(budget)
  best = np.full(limit + 1, np.inf)
  best[0] = 0.0
  for u in units:
    after = np.full(limit + 1, np.inf)
    for o in u.options:
      b = int(o.bits)
      if b <= limit:
        after[b:] = np.minimum(after[b:], best[: limit + 1 - b] + o.error)
    best = after
  return float(best.min())


def test_allocation_fits_the_budget_and_is_near_the_optimum():
  gaps = []
  for seed in range(12):
    rng = np.random.default_rng(seed)
    units = _random_units(rng, n_units=40, n_options=5)
    least = sum(min(o.bits for o in u.options) for u in units)
    most = sum(max(o.bits for o in u.options) for u in units)
    budget = float(rng.uniform(least, most))
    chosen = allocate(units, budget)
    bits = sum(u.options[i].bits for u, i in zip(units, chosen, strict=True))
    error = sum(u.options[i].error for u, i in zip(units, chosen, strict=True))
    assert bits <= budget
    gaps.append(error / _optimum(units, budget) - 1)
    # Any uniform assignment (every unit at its k-th cheapest option) that fits has at least the allocation's error.
    for k in range(5):
      pick = [sorted(range(5), key=lambda i, u=u: u.options[i].bits)[k] for u in units]
      if sum(u.options[i].bits for u, i in zip(units, pick, strict=True)) <= budget:
        assert error <= sum(u.options[i].error for u, i in zip(units, pick, strict=True)) + 1e-12
  # A Lagrangian's hull walk is optimal but for the one step the budget cuts short; over 40 units that costs a few
  # percent at worst (measured over 100 seeds: at most 5.5%, median 0).
  assert max(gaps) < 0.06 and np.mean(gaps) < 0.02, gaps


def test_bits_go_where_they_remove_most_error():
  sensitive = Unit(("a",), (Option("4", 4.0, 10.0), Option("8", 8.0, 0.1)))
  robust = Unit(("b",), (Option("4", 4.0, 1.0), Option("8", 8.0, 0.5)))
  assert allocate([robust, sensitive], 12.0) == [0, 1]
  assert allocate([robust, sensitive], 16.0) == [1, 1]
  assert allocate([robust, sensitive], 8.0) == [0, 0]


def test_dominated_options_are_never_chosen():
  unit = Unit(("a",), (Option("Q4_0", 4.5, 2.0), Option("Q4_1", 5.0, 3.0), Option("Q5_0", 5.5, 1.0)))
  assert allocate([unit], 5.2) == [0]  # Q4_1 fits but adds more error than the cheaper Q4_0
  assert allocate([unit], 6.0) == [2]


def test_a_budget_below_the_cheapest_is_refused_naming_both():
  unit = Unit(("a",), (Option("4", 400.0, 1.0),))
  with pytest.raises(ValueError, match="budget of 300 bits is below the 400 bits"):
    allocate([unit], 300.0)
