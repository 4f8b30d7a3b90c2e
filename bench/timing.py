"""Shared timing helper of the bench/ scripts."""

import statistics
import time


def median_seconds(function, repeats: int = 5) -> float:
  """Median wall time of `function()` over `repeats` calls; its result is forced with .numpy()."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    function().numpy()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
