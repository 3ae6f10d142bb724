"""Where per-item passes run: in this process, or as an Apache Beam pipeline (`beam_pipeline.py`).

Two kinds of pass, each a pure function (or two) applied to fixed chunks of items:
  * `map_chunks`: one result per chunk, in chunk order;
  * `group_by_key`: each chunk emits (key, value) pairs, the values are grouped by key (Beam's
    `GroupByKey`: a shuffle across workers), and each group is reduced where it lands; only the
    reductions that found something come back, in no particular order.
Both executors run the same functions over the same chunks, so a pass gives identical numbers
whichever executor ran it. That is what lets a test compare the Beam path with the in-process path
on one category map.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import tqdm

from oclear_jax.governance import settings as settings_lib


class Executor(Protocol):

  def map_chunks(self, name: str, fn: Callable[..., Any], chunks: Iterable[Any],
                 sizes: Sequence[int] | None = None, shared: Any = None) -> list[Any]:
    """[fn(chunk) for chunk in chunks] (fn(chunk, shared) when `shared` is given: what every chunk of the
    pass reads, shipped once), with a progress bar named `name` counting items (`sizes`). `chunks` may be
    a generator: each chunk is made when it is needed, so the pass never holds a second copy of its input."""

  def group_by_key(self, name: str, emit: Callable[..., Iterable[tuple[Any, Any]]], reduce: Callable[..., Any],
                   chunks: Iterable[Any], sizes: Sequence[int] | None = None, shared: Any = None) -> list[Any]:
    """The non-None reduce(key, values) of every key that emit(chunk) yields (with `shared` as the last
    argument of both when given). Keys must be hashable and picklable the same way in every process
    (ints, str, bytes, tuples of them); `values` come in no particular order, so `reduce` must not depend on it."""


class InProcessExecutor:
  """Runs each chunk here, one after the other."""

  def __init__(self, progress: bool = True):
    self.progress = progress

  def map_chunks(self, name, fn, chunks, sizes=None, shared=None):
    chunks = chunks if sizes is not None else list(chunks)
    sizes = list(sizes) if sizes is not None else [1] * len(chunks)
    results = []
    with tqdm.tqdm(total=sum(sizes), desc=name, unit="item", disable=not self.progress) as bar:
      for chunk, size in zip(chunks, sizes):
        results.append(fn(chunk) if shared is None else fn(chunk, shared))
        bar.update(size)
    return results

  def group_by_key(self, name, emit, reduce, chunks, sizes=None, shared=None):
    chunks = chunks if sizes is not None else list(chunks)
    sizes = list(sizes) if sizes is not None else [1] * len(chunks)
    extra = () if shared is None else (shared,)
    groups = collections.defaultdict(list)
    with tqdm.tqdm(total=sum(sizes), desc=name, unit="item", disable=not self.progress) as bar:
      for chunk, size in zip(chunks, sizes):
        for key, value in emit(chunk, *extra):
          groups[key].append(value)
        bar.update(size)
    results = (reduce(key, values, *extra) for key, values in groups.items())
    return [result for result in results if result is not None]


def row_chunks(rows: np.ndarray | int, size: int) -> list[np.ndarray]:
  """`rows` (or np.arange(rows)) cut into consecutive chunks of `size`: the fixed chunks a pass runs over."""
  rows = np.arange(rows) if isinstance(rows, int) else rows
  return [rows[i:i + size] for i in range(0, len(rows), size)]


def make_executor(settings: settings_lib.GovernanceSettings, staging_dir: str, *, progress: bool = True) -> Executor:
  if settings.executor == "in_process":
    return InProcessExecutor(progress=progress)
  from oclear_jax.governance import beam_pipeline  # pylint: disable=g-import-not-at-top  (imports Beam)
  return beam_pipeline.BeamExecutor(runner=settings.beam_runner, options=settings.beam_options,
                                    staging_dir=staging_dir, progress=progress)
