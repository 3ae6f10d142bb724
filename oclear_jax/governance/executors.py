"""Where per-item passes run: in this process, or as an Apache Beam pipeline (`beam_pipeline.py`).

A pass is a pure function applied to fixed chunks of items; both executors cut the same chunks and
return results in chunk order, so a pass gives identical numbers whichever executor ran it. That
is what lets a test compare the Beam path with the in-process path on one category map.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import tqdm

from oclear_jax.governance import settings as settings_lib


class Executor(Protocol):

  def map_chunks(self, name: str, fn: Callable[..., Any], chunks: Iterable[Any],
                 sizes: Sequence[int] | None = None, shared: Any = None) -> list[Any]:
    """[fn(chunk) for chunk in chunks] (fn(chunk, shared) when `shared` is given: what every chunk of the
    pass reads, shipped once), with a progress bar named `name` counting items (`sizes`). `chunks` may be
    a generator: each chunk is made when it is needed, so the pass never holds a second copy of its input."""


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


def make_executor(settings: settings_lib.GovernanceSettings, staging_dir: str, *, progress: bool = True) -> Executor:
  if settings.executor == "in_process":
    return InProcessExecutor(progress=progress)
  from oclear_jax.governance import beam_pipeline  # pylint: disable=g-import-not-at-top  (imports Beam)
  return beam_pipeline.BeamExecutor(runner=settings.beam_runner, options=settings.beam_options,
                                    staging_dir=staging_dir, progress=progress)
