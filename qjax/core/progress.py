"""A small progress line with ETA for long loops, written to stderr."""

import sys
import time
from collections.abc import Iterable, Iterator


def progress[T](items: Iterable[T], *, total: int, label: str, enabled: bool = True) -> Iterator[T]:
  """Yields `items`, printing ``label i/total, elapsed, ETA`` after each one.

  The first item usually includes compilation, so the ETA uses the mean time of the
  items after it once there are any.
  """
  start = time.perf_counter()
  first_done = None
  for i, item in enumerate(items, 1):
    yield item
    now = time.perf_counter()
    if first_done is None:
      first_done = now
    if enabled:
      steady = (now - first_done) / (i - 1) if i > 1 else now - start
      eta = steady * (total - i)
      sys.stderr.write(f"\r{label} {i}/{total}  elapsed {now - start:6.1f}s  ETA {eta:6.1f}s ")
      sys.stderr.flush()
  if enabled:
    sys.stderr.write("\n")
