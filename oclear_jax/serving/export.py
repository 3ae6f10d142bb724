"""Embedding export: a gallery of any size, embedded on the mesh, written as resumable shards.

Embedding a million-document catalogue takes long enough to be interrupted, so the output
is a directory of fixed-size shards plus a manifest, and a rerun only redoes what is missing:

  manifest.json             fingerprint, total rows, shard size, dim, columns, and per
                            finished shard its row count and the byte size of each file
  shard-00000.vectors.npy   f32[rows, dim]
  shard-00000.<column>.npy  1-D, one per column (ids and titles as UTF-8 bytes, labels, ...)

Shard i always holds rows [i * shard_size, (i + 1) * shard_size) of the source order, so a
shard is a pure function of (source, fingerprint) and can be redone alone. Files are written
under a temporary name and renamed, then the manifest is replaced atomically; a shard counts
as finished only when the manifest lists it *and* every file has the recorded size and loads
with the recorded shape, so a deleted or truncated ("torn") shard is simply redone. A
different fingerprint (another checkpoint, other records, another preprocessing) starts the
export afresh instead of mixing embeddings of two models.

`device_embedder` turns the task's jitted predict function into "host batch in, numpy
vectors out": the batch is padded to the fixed batch size (one compilation; the last batch
is short), placed on the mesh with `sharding.global_batch`, and the padding cut off again.

On N processes every process reads the same batches and embeds its share of each
(`host_gather`), and process 0 alone writes the files: it also decides, before anyone reads
them, which shards a previous run finished, so every process resumes from the same row.

The directory may be a URL (gs://bucket/run/index/documents): every file goes through
`input_pipeline.paths`, shards are serialized in memory and written whole, and reads memory-map
local files (as before) but load a URL's shard from its bytes (a shard check reads only the
.npy header).
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from oclear_jax.distributed import multihost
from input_pipeline import paths
from oclear_jax.distributed import host_gather

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VECTORS = "vectors"

Batch = dict[str, np.ndarray]


def device_embedder(predict: Callable, params: Any, place: Callable[[Batch], Any], batch_size: int, head: str,
                    inputs: Sequence[str] = ("image", "title_tokens")) -> Callable[[Batch], np.ndarray]:
  """`embed(host_batch) -> f32[n, d]` from `task.jit_predict()` and the state's params.

  On N processes `embed` is a collective: every process passes the same host batch, embeds its
  share of it and gets every row back (`host_gather.MeshEmbedder.batch`).

  Args:
    predict: `predict(params, device_batch) -> {'query': ..., 'doc': ...}`.
    params: the state's params.
    place: host batch -> global device batch (`sharding.global_batch` on the mesh).
    batch_size: the fixed device batch (a multiple of the mesh's batch shards).
    head: 'query' (shopper photos) or 'doc' (catalogue image + title).
    inputs: the batch keys the predict function reads.
  """
  embedder = host_gather.MeshEmbedder(lambda batch: predict(params, batch), place, batch_size, tuple(inputs),
                                      outputs=(head,))

  def embed(batch: Batch) -> np.ndarray:
    return np.asarray(embedder.batch(batch)[head], np.float32)
  return embed


def _column_array(name: str, values) -> np.ndarray:
  """A 1-D array np.save can write without pickle (strings become UTF-8 bytes)."""
  values = np.asarray(values)
  if values.dtype == object:
    items = values.tolist()
    if all(isinstance(v, bytes) for v in items):
      values = np.asarray(items, dtype=bytes)
    elif all(isinstance(v, str) for v in items):
      values = np.asarray([v.encode("utf-8") for v in items], dtype=bytes)
    else:
      raise ValueError(f"column {name!r} mixes types; export columns hold numbers, str or bytes")
  elif values.dtype.kind == "U":
    values = np.char.encode(values, "utf-8")
  if values.ndim != 1:
    raise ValueError(f"column {name!r} must be 1-D per batch, got shape {values.shape}")
  return values


def _shard_file(index: int, name: str) -> str:
  return f"shard-{index:05d}.{name}.npy"


def _read_manifest(directory: str) -> dict | None:
  path = paths.join(directory, MANIFEST)
  if not paths.exists(path):
    return None
  try:
    return json.loads(paths.read_bytes(path))
  except Exception:  # pylint: disable=broad-except  # OSError/ValueError; tf.errors for URLs: a torn manifest
    return None  # start afresh


def _write_json_atomic(path: str, value: dict) -> None:
  paths.write_bytes(path, json.dumps(value, indent=1).encode("utf-8"))  # temporary sibling, then moved over


def _load_array(path: str, mmap: bool) -> np.ndarray:
  """A shard file: memory-mapped (mmap) when local, else read whole (URLs: from its bytes)."""
  if not paths.is_remote(path):
    return np.load(path, mmap_mode="r" if mmap else None)
  return np.load(io.BytesIO(paths.read_bytes(path)))


def _array_shape(path: str) -> tuple[int, ...]:
  """The shape a .npy file declares; a URL's is read from its header alone (no download of the rows)."""
  if not paths.is_remote(path):
    return np.load(path, mmap_mode="r").shape
  with paths.open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)[0]


def _shard_ok(directory: str, manifest: dict, index: int) -> bool:
  entry = manifest["shards"].get(str(index))
  if entry is None:
    return False
  for name, size in entry["files"].items():
    path = paths.join(directory, _shard_file(index, name))
    stat = paths.size_and_mtime(path)
    if stat is None or stat[0] != size:
      return False
    try:
      shape = _array_shape(path)
    except Exception:  # pylint: disable=broad-except  # OSError/ValueError; tf.errors for URLs
      return False
    if shape[0] != entry["rows"] or (name == VECTORS and shape[1:] != (manifest["dim"],)):
      return False
  return set(entry["files"]) == {VECTORS, *manifest["columns"]}


class _DuplicateCheck:
  """Remembers the row of every id seen; a repeat names both rows."""

  def __init__(self, what: str, directory: str):
    self.rows: dict[Any, int] = {}
    self.what, self.directory = what, directory

  def add(self, ids: np.ndarray, first_row: int) -> None:
    for offset, value in enumerate(ids.tolist()):
      previous = self.rows.setdefault(value, first_row + offset)
      if previous != first_row + offset:
        shown = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        raise ValueError(
            f"duplicate {self.what} id {shown!r} at rows {previous} and {first_row + offset} of the export into "
            f"{self.directory}: ids must be unique. Fix the catalogue (give the rows distinct ids or drop one), "
            f"then rerun")


def export_embeddings(
    directory: str,
    source: Callable[[int], Iterable[Batch]],
    total: int,
    embed: Callable[[Batch], np.ndarray],
    *,
    columns: Sequence[str] = ("id",),
    unique_column: str | None = "id",
    shard_size: int = 65536,
    fingerprint: str = "",
    what: str = "gallery",
    progress: bool = True,
) -> "ExportedEmbeddings":
  """Embeds `total` rows into `directory`, skipping shards a previous run finished.

  Args:
    directory: the export directory (created).
    source: `source(start_row)` -> host batches from that row on, in a fixed order (each
      a dict with the embed function's inputs and `columns`).
    total: rows the source holds.
    embed: host batch -> f32[n, d] (e.g. `device_embedder`).
    columns: batch keys saved beside the vectors, e.g. ('id', 'title', 'label').
    unique_column: a column whose values must be unique (None: no check).
    shard_size: rows per shard: the unit of resumption.
    fingerprint: identifies the model and inputs; a change restarts the export.
    what: names the rows in messages ('document', 'query').
    progress: show a tqdm bar over rows.

  Returns:
    The finished export.

  Raises:
    ValueError: duplicate ids (naming the id and rows), or a source that ends early.
  """
  columns = list(columns)
  settings = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "total": int(total),
              "shard_size": int(shard_size), "columns": columns}
  # Process 0 decides what is done (and clears a stale export) before anyone reads: one view for all.
  manifest, done = host_gather.computed_once(_resume_state, directory, settings)
  duplicates = _DuplicateCheck(what, directory) if unique_column else None
  if duplicates:
    for i in done:
      duplicates.add(_load_array(paths.join(directory, _shard_file(i, unique_column)), mmap=False), i * shard_size)
  bar = tqdm.tqdm(total=total, initial=sum(manifest["shards"][str(i)]["rows"] for i in done),
                  desc=f"{what} embeddings", unit="row", disable=not progress or jax.process_index() != 0)
  missing = [i for i in range(-(-total // shard_size)) if i not in set(done)]
  for first, last in _runs(missing):
    start, stop = first * shard_size, min((last + 1) * shard_size, total)
    buffered: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    row = start
    batches = iter(source(start))
    while row < stop:
      batch = next(batches, None)
      if batch is None:
        raise ValueError(f"the {what} source ended at row {row} but {total} rows were expected; the records "
                         f"changed under the export: rerun to start it afresh")
      take = min(len(batch[columns[0]]) if columns else len(next(iter(batch.values()))), stop - row)
      vectors = np.asarray(embed(batch), np.float32)[:take]
      cols = {c: _column_array(c, batch[c])[:take] for c in columns}
      if duplicates:
        duplicates.add(cols[unique_column], row)
      buffered.append((vectors, cols))
      row += take
      bar.update(take)
      while sum(len(v) for v, _ in buffered) >= shard_size or (row == stop and buffered):
        buffered = _flush(directory, manifest, buffered, shard_size, start_row=row - sum(len(v) for v, _ in buffered))
  bar.close()
  manifest["complete"] = True
  multihost.run_on_process_zero(_write_json_atomic, paths.join(directory, MANIFEST), manifest)
  return ExportedEmbeddings(directory)


def _resume_state(directory: str, settings: dict) -> tuple[dict, list[int]]:
  """(manifest, finished shard indices) of `directory`; a stale or torn export is cleared first."""
  paths.makedirs(directory)
  manifest = _read_manifest(directory)
  if manifest is None or any(manifest.get(k) != v for k, v in settings.items()):
    _remove_shards(directory)
    manifest = {**settings, "dim": None, "shards": {}}
  num_shards = -(-settings["total"] // settings["shard_size"])
  done = [i for i in range(num_shards) if manifest["dim"] is not None and _shard_ok(directory, manifest, i)]
  manifest["shards"] = {str(i): manifest["shards"][str(i)] for i in done}
  return manifest, done


def _runs(indices: list[int]) -> Iterator[tuple[int, int]]:
  """Contiguous runs [first, last] of sorted indices."""
  run = []
  for i in indices:
    if run and i != run[-1] + 1:
      yield run[0], run[-1]
      run = []
    run.append(i)
  if run:
    yield run[0], run[-1]


def _flush(directory: str, manifest: dict, buffered, shard_size: int, start_row: int):
  """Writes the first shard's worth of buffered rows (from start_row); returns the rest."""
  vectors = np.concatenate([v for v, _ in buffered])
  cols = {c: np.concatenate([b[c] for _, b in buffered]) for c in buffered[0][1]}
  index = start_row // shard_size
  n = min(shard_size, len(vectors))
  if manifest["dim"] is None:
    manifest["dim"] = int(vectors.shape[1])
  arrays = [(VECTORS, vectors[:n]), *((c, v[:n]) for c, v in cols.items())]
  manifest["complete"] = False
  manifest["shards"][str(index)] = host_gather.computed_once(_write_shard, directory, manifest, index, arrays)
  rest = vectors[n:]
  return [(rest, {c: v[n:] for c, v in cols.items()})] if len(rest) else []


def _write_shard(directory: str, manifest: dict, index: int, arrays: list[tuple[str, np.ndarray]]) -> dict:
  """Writes shard `index` (each file under a temporary name, then moved over), then the manifest
  listing it; the shard's manifest entry (rows and byte size of each file)."""
  sizes = {}
  for name, array in arrays:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    data = buffer.getvalue()
    paths.write_bytes(paths.join(directory, _shard_file(index, name)), data)
    sizes[name] = len(data)
  entry = {"rows": int(len(arrays[0][1])), "files": sizes}
  listed = {**manifest, "shards": {**manifest["shards"], str(index): entry}}
  _write_json_atomic(paths.join(directory, MANIFEST), listed)
  return entry


def _remove_shards(directory: str) -> None:
  for name in paths.listdir(directory):
    if name.startswith("shard-") or name == MANIFEST:
      paths.remove(paths.join(directory, name))


class ExportedEmbeddings:
  """Read access to a finished export: vectors (shard by shard; memory-mapped when local) and columns."""

  def __init__(self, directory: str):
    self.directory = directory
    manifest = _read_manifest(directory)
    if manifest is None:
      raise FileNotFoundError(f"no embedding export in {directory} ({MANIFEST} missing); build it with "
                              f"python -m oclear_jax.main --mode=index --workdir=...")
    self.manifest = manifest
    num_shards = -(-manifest["total"] // manifest["shard_size"])
    broken = [i for i in range(num_shards) if not _shard_ok(directory, manifest, i)]
    if broken or manifest["dim"] is None:
      raise ValueError(f"the embedding export in {directory} is incomplete or damaged (shards {broken[:5]} of "
                       f"{num_shards} missing or torn); rerun --mode=index to redo only those")
    self.num_shards = num_shards

  @property
  def num_rows(self) -> int:
    return int(self.manifest["total"])

  @property
  def dim(self) -> int:
    return int(self.manifest["dim"])

  @property
  def fingerprint(self) -> str:
    return self.manifest["fingerprint"]

  def _load(self, index: int, name: str, mmap: bool) -> np.ndarray:
    return _load_array(paths.join(self.directory, _shard_file(index, name)), mmap)

  def blocks(self) -> Iterator[np.ndarray]:
    """f32[rows, dim] per shard (memory-mapped when local), in row order (for `exact_top_k_blocks`)."""
    for i in range(self.num_shards):
      yield self._load(i, VECTORS, mmap=True)

  def vectors(self) -> np.ndarray:
    """All vectors in memory, f32[total, dim]."""
    out = np.empty((self.num_rows, self.dim), np.float32)
    row = 0
    for block in self.blocks():
      out[row:row + len(block)] = block
      row += len(block)
    return out

  def column(self, name: str) -> np.ndarray:
    if name not in self.manifest["columns"]:
      raise KeyError(f"column {name!r} not in the export {self.directory}; it has {self.manifest['columns']}")
    return np.concatenate([self._load(i, name, mmap=False) for i in range(self.num_shards)])
