"""The per-item passes as Apache Beam pipelines: DirectRunner here, Dataflow, Flink or Spark by a flag.

  --config.governance.executor=beam --config.governance.beam_runner=DataflowRunner \
  --config.governance.beam_options='--project=P --region=R --temp_location=gs://B/tmp'

Each pass is one pipeline: the driver stages the input chunks as files and `Create` emits only their
indices. What every chunk of a pass needs (the category statistics and centroid index of the scoring
pass) is staged once beside them and read once per DoFn instance (`setup`), not pickled into the
DoFn, which Beam would unpickle for every bundle.
  * map_chunks (featurize images, score items, write curated rows): a DoFn reads its chunk, applies
    the pass's pure function and writes the result next to it, one output per chunk.
  * group_by_key (split by label, outlier quotas and head cap by category, near duplicates by title
    band and content hash): a DoFn reads its chunk, emits (key, value) pairs and sends them to fixed
    shards by a stable hash of the key, one element per (chunk, shard), pickled by the DoFn (so the
    executor counts the bytes it shuffles); `GroupByKey` shuffles the shards across workers, and a
    DoFn groups a shard's pairs by key, reduces each key's values and writes the shard's results.
Inputs and outputs go through Beam's `FileSystems`, so the staging directory can be local
(DirectRunner) or on shared storage (gs://..., taken from --temp_location when given) for a remote
runner. Output names are fixed per chunk or shard, so a retried bundle overwrites instead of duplicating.

Merge and the long tail work on the collected centroids on the driver, which also holds every
item's features, reduced and whitened blocks and decision between passes: its memory grows with
the catalogue (benchmarks/governance_scale.py measures it per row).
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import re
import shlex
import threading
import uuid
import zlib

import tqdm

_root_logger = logging.getLogger()
_level = _root_logger.level
_root_logger.setLevel(logging.ERROR)  # Beam's import warns about optional GCP clients we do not use.
try:
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
finally:
  _root_logger.setLevel(_level)


def _write(path: str, value) -> int:
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
  with FileSystems.create(tmp) as f:
    f.write(data)
  FileSystems.rename([tmp], [path])
  return len(data)


def _read_sized(path: str):
  with FileSystems.open(path) as f:
    data = f.read()
  return pickle.loads(data), len(data)


def _read(path: str):
  return _read_sized(path)[0]


class _RunChunk(beam.DoFn):
  """Reads chunk `index` from the staging directory, applies `fn` (with the pass's shared value, read
  once per DoFn instance in `setup`), writes the result."""

  def __init__(self, fn, directory: str, has_shared: bool):
    super().__init__()
    self._fn = fn
    self._directory = directory
    self._has_shared = has_shared
    self._shared = None

  def setup(self):
    if self._has_shared:
      self._shared = _read(FileSystems.join(self._directory, "shared.pkl"))

  def process(self, index: int):
    chunk = _read(FileSystems.join(self._directory, f"in-{index:06d}.pkl"))
    result = self._fn(chunk, self._shared) if self._has_shared else self._fn(chunk)
    _write(FileSystems.join(self._directory, f"out-{index:06d}.pkl"), result)
    yield index


def shard_of(key, shards: int) -> int:
  """The output shard of a key: crc32 of its pickle, not hash(), which Python salts per process for bytes."""
  return zlib.crc32(pickle.dumps(key, protocol=4)) % shards


class _EmitShards(beam.DoFn):
  """Reads chunk `index`, sorts emit(chunk[, shared])'s (key, value) pairs into shards by key, and yields
  (shard, pickled pairs) for each shard that got any: Beam's cost is per element, so a chunk sends one
  element per shard, not one per key."""

  def __init__(self, emit, directory: str, has_shared: bool, shards: int):
    super().__init__()
    self._fn, self._directory, self._has_shared, self._shards = emit, directory, has_shared, shards
    self._extra = ()

  def setup(self):
    if self._has_shared:
      self._extra = (_read(FileSystems.join(self._directory, "shared.pkl")),)

  def process(self, index: int):
    batches = collections.defaultdict(list)
    for key, value in self._fn(_read(FileSystems.join(self._directory, f"in-{index:06d}.pkl")), *self._extra):
      batches[shard_of(key, self._shards)].append((key, value))
    for shard, pairs in batches.items():
      yield shard, pickle.dumps(pairs, protocol=pickle.HIGHEST_PROTOCOL)


class _ReduceShard(_EmitShards):
  """Groups one shard's pairs by key, reduces each key's values and writes the shard's results and the
  bytes it received (every shard gets an empty batch too, so every shard is written and a missing one
  means a failed run)."""

  def process(self, element):
    shard, batches = element
    groups = collections.defaultdict(list)
    received = 0
    for batch in batches:
      received += len(batch)
      for key, value in pickle.loads(batch) if batch else ():
        groups[key].append(value)
    results = (self._fn(key, values, *self._extra) for key, values in groups.items())
    _write(FileSystems.join(self._directory, f"out-{shard:06d}.pkl"),
           ([r for r in results if r is not None], received))
    yield shard


class BeamExecutor:
  """`map_chunks` and `group_by_key` as one Beam pipeline per pass."""

  def __init__(self, runner: str = "DirectRunner", options: str = "", staging_dir: str = "", progress: bool = True):
    self.runner = runner
    self.flags = shlex.split(options)
    temp_location = PipelineOptions(self.flags).get_all_options().get("temp_location")
    self.staging_dir = FileSystems.join(temp_location, "oclear_governance") if temp_location else staging_dir
    if not self.staging_dir:
      raise ValueError("BeamExecutor needs a staging directory: pass staging_dir, or --temp_location in "
                       "config.governance.beam_options")
    self.progress = progress
    self.staged_bytes = 0  # chunks staged to and results read back from the staging directory, all passes
    self.shuffle_bytes = 0  # pickled (key, value) batches that group_by_key's GroupByKey moved, all passes

  def map_chunks(self, name, fn, chunks, sizes=None, shared=None):
    def build(pipeline, safe_name, directory, count):
      _ = (pipeline
           | f"{safe_name}: chunk ids" >> beam.Create(list(range(count)))
           | f"{safe_name}: run" >> beam.ParDo(_RunChunk(fn, directory, shared is not None)))
      return count
    return self._run(name, chunks, sizes, shared, build)

  def group_by_key(self, name, emit, reduce, chunks, sizes=None, shared=None):
    def build(pipeline, safe_name, directory, count):
      shards = max(1, count)  # as many as input chunks: a shard holds about a chunk's worth of pairs
      has_shared = shared is not None
      pairs = (pipeline
               | f"{safe_name}: chunk ids" >> beam.Create(list(range(count)))
               | f"{safe_name}: emit keys" >> beam.ParDo(_EmitShards(emit, directory, has_shared, shards)))
      every_shard = pipeline | f"{safe_name}: shard ids" >> beam.Create([(k, b"") for k in range(shards)])
      _ = ((pairs, every_shard)
           | f"{safe_name}: with every shard" >> beam.Flatten()
           | f"{safe_name}: group by shard" >> beam.GroupByKey()
           | f"{safe_name}: reduce" >> beam.ParDo(_ReduceShard(reduce, directory, has_shared, shards)))
      return shards
    shards = self._run(name, chunks, sizes, shared, build)
    self.shuffle_bytes += sum(received for _, received in shards)
    return [result for results, _ in shards for result in results]

  def _run(self, name, chunks, sizes, shared, build):
    """Stages the chunks (and `shared`), runs the pipeline that `build` adds, returns out-000000.pkl, ... in order."""
    chunks = chunks if sizes is not None else list(chunks)
    sizes = list(sizes) if sizes is not None else [1] * len(chunks)
    safe_name = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    directory = FileSystems.join(self.staging_dir, f"{safe_name}-{uuid.uuid4().hex[:12]}")
    if "://" not in directory:
      os.makedirs(directory, exist_ok=True)
    count = 0
    for chunk in chunks:  # one at a time: a generator's chunks are made as they are staged
      self.staged_bytes += _write(FileSystems.join(directory, f"in-{count:06d}.pkl"), chunk)
      count += 1
    if shared is not None:
      self.staged_bytes += _write(FileSystems.join(directory, "shared.pkl"), shared)
    done = threading.Event()
    watcher = threading.Thread(target=self._watch, args=(name, directory, sizes, done), daemon=True)
    watcher.start()
    try:
      pipeline = beam.Pipeline(options=PipelineOptions(self.flags, runner=self.runner))
      outputs = build(pipeline, safe_name, directory, count)
      result = pipeline.run()
      try:
        result.wait_until_finish()
      finally:
        client = getattr(result, "client", None)  # DaskRunner leaves its distributed.Client open
        if client is not None:
          client.close()
      missing = [i for i in range(outputs)
                 if not FileSystems.exists(FileSystems.join(directory, f"out-{i:06d}.pkl"))]
      if missing:
        raise RuntimeError(f"Beam pass {name!r} on {self.runner} finished without results for outputs {missing[:10]} "
                           f"in {directory}; check the runner's logs")
      results = [_read_sized(FileSystems.join(directory, f"out-{i:06d}.pkl")) for i in range(outputs)]
      self.staged_bytes += sum(size for _, size in results)
      return [value for value, _ in results]
    finally:
      done.set()
      watcher.join()
      FileSystems.delete([directory])

  def _watch(self, name, directory, sizes, done):
    """A progress bar fed by the result files appearing in the staging directory."""
    with tqdm.tqdm(total=sum(sizes), desc=f"{name} [beam]", unit="item", disable=not self.progress) as bar:
      seen: set[int] = set()
      while True:
        finished = done.wait(0.5)
        try:
          matches = FileSystems.match([FileSystems.join(directory, "out-*.pkl")])[0].metadata_list
        except Exception:  # pylint: disable=broad-except  # The directory may already be gone at the end.
          matches = []
        for metadata in matches:
          index = int(os.path.basename(metadata.path)[4:10])
          if index not in seen:
            seen.add(index)
            bar.update(sizes[index] if index < len(sizes) else 0)
        if finished:
          return
