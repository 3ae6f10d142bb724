"""Wall seconds per governance step, for the report and benchmarks/governance_scale.py."""
from __future__ import annotations

import contextlib
import time


class StepClock:
  """Accumulates wall seconds per step name (a step timed twice, e.g. once per round, adds up)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def step(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
