"""Metrics to the workdir: JSON lines (for scripts) and TensorBoard events (for people)."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax

from input_pipeline import paths


class MetricWriter:
  """Writes scalars to `{workdir}/metrics.jsonl` and TensorBoard; only process 0 writes.

  `resume_step`: the step a resumed run restarts from. Rows a previous attempt wrote past it
  (steps trained again now) are dropped first, so each step's row appears once.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._active:
      paths.makedirs(workdir)
      _drop_rows_after(paths.join(workdir, "metrics.jsonl"), resume_step)
      self._jsonl = paths.open(paths.join(workdir, "metrics.jsonl"), "a")  # gfile appends on gs:// too
      import tensorflow as tf  # pylint: disable=g-import-not-at-top  (TF is heavy; only writers need it)
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time(), **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for key, value in clean.items():
        self._tf.summary.scalar(key, value)
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites `path` without its rows of steps after `step` (a torn last line goes too); untouched if none."""
  if not paths.exists(path):
    return
  with paths.open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut off by a kill
  if len(kept) < len(lines):
    paths.write_bytes(path + ".tmp", "".join(line + "\n" for line in kept).encode())
    paths.replace(path + ".tmp", path)


class ProgressLine:
  """One log line per report: step, loss, examples/s and ETA (measured between reports)."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int, scalars: Mapping[str, float]) -> tuple[str, float]:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    elapsed = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    examples_per_s = steps * self.batch_size / elapsed
    eta_s = (self.total_steps - step) * elapsed / steps
    parts = [f"step {step}/{self.total_steps}"]
    parts += [f"{k} {v:.4f}" for k, v in scalars.items()]
    parts += [f"{examples_per_s:.1f} ex/s", f"ETA {_format_seconds(eta_s)}"]
    return " | ".join(parts), examples_per_s


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
