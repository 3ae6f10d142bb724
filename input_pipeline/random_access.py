"""Reads single records of a split by example index, through the index the record writer saved.

Why random access: a host that streams record files must read everything before the example it
wants. With `{split}.index.npy` (shard, byte offset, length, label per example; records.py) a host
reads exactly the examples of its slice of each global batch, and a resumed run starts at its
step with no replay. Example j of a split is the j-th the writer wrote (shard j % n, round robin);
that order is also the order `pipeline.make_dataset` streams (interleave of <= 16 shards).
"""
from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Sequence

import numpy as np

from input_pipeline import records
from input_pipeline import paths


def _open(path: str):
  """Plain files locally (seek + read is ~2 us, 10x gfile's); gfile for gs:// and other schemes."""
  return paths.open(path, "rb")  # pylint: disable=consider-using-with  (kept open by the reader)


_exists = paths.exists


def load_index(record_dir: str | os.PathLike, split: str) -> np.ndarray:
  """records.INDEX_DTYPE[examples of `split`]: where each example lies, and its label."""
  path = os.path.join(os.fspath(record_dir), records.index_name(split))
  if not _exists(path):
    raise FileNotFoundError(f"{path} not found: records written before format {records.FORMAT_VERSION} have no "
                            "index; rerun --mode=prepare (or input_pipeline.records.write_records) to rewrite them")
  with _open(path) as f:
    return np.load(io.BytesIO(f.read()), allow_pickle=False)


class RecordReader:
  """Serialized tf.train.Examples of one split by index; counts what it reads (`examples_read`)."""

  def __init__(self, record_dir: str | os.PathLike, split: str):
    summary = records_summary(record_dir)
    if split not in summary["files"]:
      raise ValueError(f"split {split!r} not in {record_dir}; have {list(summary['files'])}")
    self.record_dir, self.split = os.fspath(record_dir), split
    self.files = [os.path.join(self.record_dir, f) for f in summary["files"][split]]
    self.index = load_index(record_dir, split)
    self.examples_read = 0
    self._handles: dict[int, object] = {}
    self._lock = threading.Lock()  # one seek + read at a time: tf.data may run two iterators of a dataset

  def __len__(self) -> int:
    return len(self.index)

  @property
  def labels(self) -> np.ndarray:
    return self.index["label"]

  def read(self, indices: Sequence[int] | np.ndarray) -> list[bytes]:
    """The serialized examples at `indices`, in that order; checks each record's length header."""
    with self._lock:
      return self._read(np.asarray(indices, np.int64).tolist())

  def _read(self, indices: list[int]) -> list[bytes]:
    out = []
    for j in indices:
      shard, offset, length, _ = self.index[j].tolist()
      handle = self._handle(shard)
      handle.seek(offset)
      raw = handle.read(records.RECORD_HEADER_BYTES + length)
      if len(raw) != records.RECORD_HEADER_BYTES + length or int.from_bytes(raw[:8], "little") != length:
        raise IOError(f"{self.files[shard]}: example {j} of {self.split!r} is not at byte {offset} "
                      f"(length {length}) as {records.index_name(self.split)} says; the records changed after "
                      "they were indexed: rerun --mode=prepare to rewrite them")
      out.append(raw[records.RECORD_HEADER_BYTES:])
    self.examples_read += len(out)
    return out

  def _handle(self, shard: int):
    if shard not in self._handles:
      self._handles[shard] = _open(self.files[shard])
    return self._handles[shard]

  def close(self) -> None:
    for handle in self._handles.values():
      handle.close()
    self._handles.clear()


def records_summary(record_dir: str | os.PathLike) -> dict:
  """records.json of `record_dir` (its presence means the records are complete)."""
  path = os.path.join(os.fspath(record_dir), records.SUMMARY_FILE)
  if not _exists(path):
    raise FileNotFoundError(f"{path} not found: {record_dir} holds no complete records; "
                            "write them with input_pipeline.records.write_records")
  with _open(path) as f:
    return json.loads(f.read())
