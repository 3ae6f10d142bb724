"""Embedding on a mesh that spans processes: each host feeds its share, every host gets every row.

On N hosts a global batch is built from every process's local rows (the caller's `place`, i.e.
`jax.make_array_from_process_local_data`), and its outputs live partly on devices another
process owns: `np.asarray` on them raises "spans non-addressable devices". `MeshEmbedder` is the
one way evaluators, export, embed, index and search run a jitted function over host rows:

* `step(local_batch)`: one global batch from this process's rows, padded to the fixed local
  batch (one compilation; a process with fewer or no rows feeds padding, so every process runs
  the same jitted steps); each process reads back only the rows it fed, from its own devices;
* `stream(local_batches)`: a split each host reads its share of (round robin, as the input
  pipeline's `ds.shard(count, index)` deals records: process p holds rows p, p + P, ...),
  stepped until every process is out of rows, then gathered once, in source order;
* `batch(host_batch)`: a batch every host holds; each embeds its round-robin share of it.

`gather_rows` sends each process's rows through `multihost.gather_objects` (pickled bytes: exact
for any dtype, strings included, uneven counts); rows then go back into source
order by their row numbers, so results do not depend on the process count. `computed_once` runs
a step on process 0 only (metrics, files) and hands its result to every process. With one
process nothing here is a collective and every result equals the plain `np.asarray` path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from oclear_jax.distributed import multihost

HostBatch = dict[str, np.ndarray]
ROW = "row"  # the column of source row numbers in gathered results
_T = TypeVar("_T")


# == Collectives on host values ====================================================================
def computed_once(fn: Callable[..., _T], *args, **kwargs) -> _T:
  """`fn(*args, **kwargs)` on process 0 only (one writer per file, one ScaNN build), its result on all.

  A failure on process 0 is raised on every process (`multihost.run_on_process_zero`).
  """
  result = multihost.run_on_process_zero(fn, *args, **kwargs)
  return result if jax.process_count() == 1 else multihost.gather_objects(result)[0]


def gather_rows(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows of `columns` (equal keys everywhere), concatenated in process order."""
  parts = [p for p in multihost.gather_objects(dict(columns)) if p]
  if len(parts) <= 1:
    return parts[0] if parts else {}
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def in_source_order(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`columns` sorted by their `row` numbers, each row once (replicas of a row are equal), `row` dropped."""
  _, first = np.unique(columns[ROW], return_index=True)
  if np.array_equal(first, np.arange(len(columns[ROW]))):
    return {k: v for k, v in columns.items() if k != ROW}
  return {k: v[first] for k, v in columns.items() if k != ROW}


# == Shares =========================================================================================
def local_batch_size(global_batch_size: int) -> int:
  """This process's rows of a global batch: the batch split evenly over the processes."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"config.eval.batch_size={global_batch_size} must divide over {count} processes")
  return global_batch_size // count


def share_rows(num_rows: int) -> np.ndarray:
  """This process's rows of `num_rows`: p, p + P, ... (round robin, like the pipeline's `ds.shard`)."""
  return np.arange(jax.process_index(), num_rows, jax.process_count())


def share_row_numbers(first: int, count: int) -> np.ndarray:
  """Source row numbers of this process's local rows first .. first + count - 1 of a round-robin share."""
  return jax.process_index() + jax.process_count() * np.arange(first, first + count)


def _pad(batch: Mapping[str, np.ndarray], size: int, keys: Sequence[str]) -> HostBatch:
  """Rows repeated from the last (real inputs, cut off after) up to `size`; zeros for an empty batch."""
  out = {}
  for key in keys:
    value = np.asarray(batch[key])
    n = len(value)
    if n == 0:
      value = np.zeros((size, *value.shape[1:]), value.dtype)
    elif n < size:
      value = np.concatenate([value, np.repeat(value[-1:], size - n, axis=0)])
    out[key] = value
  return out


def _agree(batch: Mapping[str, np.ndarray] | None, keys: Sequence[str]) -> tuple[int, HostBatch | None]:
  """(rows of all processes together, an empty batch of the shapes they feed); a collective.

  A process out of rows (or that never had any) still feeds a batch of the right shapes.
  """
  spec = None if batch is None else (len(batch[keys[0]]), {
      k: (np.shape(batch[k])[1:], np.asarray(batch[k]).dtype) for k in keys})
  specs = [s for s in multihost.gather_objects(spec) if s is not None]
  if not specs:
    return 0, None
  return sum(n for n, _ in specs), {k: np.zeros((0, *shape), dtype) for k, (shape, dtype) in specs[0][1].items()}


# == Reading back this process's rows ===============================================================
def local_positions(array: jax.Array) -> np.ndarray:
  """The global rows of `array` this process's devices hold, sorted: the order in which
  `jax.make_array_from_process_local_data` took them from this process's local data."""
  rows = set()
  for index in array.sharding.addressable_devices_indices_map(array.shape).values():
    rows.update(range(*index[0].indices(array.shape[0])))
  return np.asarray(sorted(rows), np.int64)


def take_rows(array: jax.Array, positions: np.ndarray) -> np.ndarray:
  """`array[positions]` on the host, from this process's own shards (no fetch across hosts).

  Falls back to `process_allgather` (a collective, exact) where the local shards do not cover
  those rows whole; the layouts are the same on every process, so all take the same branch.
  """
  if not isinstance(array, jax.Array) or array.is_fully_addressable:
    return np.asarray(array)[positions]
  out = np.zeros((len(positions), *array.shape[1:]), array.dtype)
  covered = np.zeros(out.shape, bool)
  for shard in array.addressable_shards:
    rows = np.arange(*shard.index[0].indices(array.shape[0]))
    at = np.searchsorted(positions, rows)
    mine = (at < len(positions)) & (positions[np.minimum(at, len(positions) - 1)] == rows)
    if mine.any():
      target = (at[mine], *shard.index[1:])
      out[target] = np.asarray(shard.data)[mine]
      covered[target] = True
  if covered.all():
    return out
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))[positions]


# == The embedder ===================================================================================
@dataclasses.dataclass
class MeshEmbedder:
  """Runs `fn(place(host_batch)) -> {name: global array [B, ...]}` over host rows on any process count.

  Attributes:
    fn: device batch -> outputs, every output's first axis the batch's (a jitted predict).
    place: host batch (this process's rows) -> global device batch (`sharding.global_batch`).
    batch_size: the global batch B (one compilation); each process feeds B / process_count rows.
    inputs: the batch keys `fn` reads (only these are padded and placed).
    outputs: the outputs to bring back (default: every output that is not None).
  """
  fn: Callable[[dict[str, Any]], Mapping[str, Any]]
  place: Callable[[HostBatch], dict[str, Any]]
  batch_size: int
  inputs: Sequence[str]
  outputs: Sequence[str] | None = None

  @property
  def local_size(self) -> int:
    return local_batch_size(self.batch_size)

  def step(self, batch: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """Outputs of this process's rows of one global batch (up to `local_size` of them, or None:
    none); None when no process has a row. A collective: every process calls it equally often."""
    n = 0 if batch is None else len(batch[self.inputs[0]])
    if n > self.local_size:
      raise ValueError(f"batch of {n} rows exceeds this process's share {self.local_size} of the device batch "
                       f"{self.batch_size}")
    if jax.process_count() == 1:
      return None if batch is None else self._run(_pad(batch, self.batch_size, self.inputs), n)
    total, empty = _agree(batch if n else None, self.inputs)
    if not total:
      return None
    return self._run(_pad(batch if n else empty, self.local_size, self.inputs), n)

  def _run(self, padded: HostBatch, n: int) -> dict[str, np.ndarray]:
    """The outputs of the first `n` rows of this process's `padded` part of a global batch."""
    placed = self.place(padded)
    out = self.fn(placed)
    if jax.process_count() == 1:
      return {k: np.asarray(out[k])[:n] for k in self._names(out)}
    positions = local_positions(placed[self.inputs[0]])
    if len(positions) != self.local_size:
      raise ValueError(f"the mesh gives process {jax.process_index()} {len(positions)} rows of a batch of "
                       f"{self.batch_size}, not 1/{jax.process_count()} of it: config.mesh.shape must split the "
                       f"batch axis over the processes")
    return {k: take_rows(out[k], positions)[:n] for k in self._names(out)}

  def _names(self, out: Mapping[str, Any]) -> list[str]:
    return list(self.outputs) if self.outputs is not None else [k for k, v in out.items() if v is not None]

  def stream(self, local_batches: Iterable[Mapping[str, np.ndarray]], columns: Sequence[str] = ()) -> dict:
    """Outputs and `columns` of every row of a split, in source order, on every process.

    `local_batches`: this process's round-robin share of the split, in order, in batches of at
    most `local_size` rows (the pipeline's `ds.shard(process_count, process_index)` share).
    Empty dict when the split has no row at all.
    """
    batches, parts, seen = iter(local_batches), [], 0
    while True:
      batch = next(batches, None)
      out = self.step(batch)
      if out is None:
        break
      if batch is not None:
        n = len(batch[self.inputs[0]])
        parts.append({**out, **{c: np.asarray(batch[c])[:n] for c in columns},
                      ROW: share_row_numbers(seen, n)})
        seen += n
    local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    gathered = gather_rows(local)
    return in_source_order(gathered) if gathered else {}

  def batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of every row of `batch` (at most `batch_size` rows, the same batch on every
    process); each process embeds its round-robin share. A collective."""
    n = len(batch[self.inputs[0]])
    if n > self.batch_size:
      raise ValueError(f"batch of {n} rows exceeds the device batch size {self.batch_size}")
    if jax.process_count() == 1 or n == 0:  # (no rows: one padded step still gives the output shapes)
      return self._run(_pad(batch, self.local_size, self.inputs), n)
    rows = share_rows(n)
    out = self.step({k: np.asarray(batch[k])[rows] for k in self.inputs})
    return in_source_order(gather_rows({**out, ROW: rows} if out is not None else {}))
