"""tf.data input pipelines over the records written by `input_pipeline.records`.

Training (`make_train_dataset`) and each host's share of an eval split (`make_share_dataset`) read
records by index (`random_access`): a host reads only its examples, and the examples of global
batch s are a function of (seed, s) (`global_order`), so the global batch sequence is the same for
any process count and a resumed run starts at its step without replaying the stream:
  global order -> this process's slice -> read by index -> parse -> preprocess(seed, global
  position) -> batch -> prefetch

`make_dataset` streams whole splits (exports, galleries, tests):
  files -> interleave (deterministic) -> shard per process -> parse -> filter kinds
  -> [decode + cache] -> shuffle(seed) -> repeat -> enumerate (per-example seed)
  -> preprocess -> batch -> prefetch
Sharding comes before shuffling so every process sees a fixed disjoint slice; the
per-example seed comes after repeat so each epoch gets fresh (but reproducible)
augmentations.
"""

import itertools
import json
import os
import pathlib
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from input_pipeline import global_order
from input_pipeline import preprocess_ops
from input_pipeline import random_access
from input_pipeline import records
from input_pipeline import paths

# TensorFlow must never take an accelerator that JAX needs; it only feeds data.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Devices were already initialised by someone else; keep going.
  pass

_FEATURES = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "image": tf.io.FixedLenFeature([], tf.string),
    "title": tf.io.FixedLenFeature([], tf.string),
    "title_tokens": tf.io.VarLenFeature(tf.int64),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "kind": tf.io.FixedLenFeature([], tf.int64),
}


def read_summary(record_dir: str | os.PathLike) -> dict:
  path = paths.join(record_dir, records.SUMMARY_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} not found: {record_dir} holds no complete records; "
                            "write them with input_pipeline.records.write_records")
  with paths.open(path) as f:
    return json.load(f)


def count_examples(record_dir: str | os.PathLike, split: str,
                   kinds: Optional[str | Sequence[str]] = None) -> int:
  """Examples in a split (optionally of some kinds), from records.json."""
  counts = read_summary(record_dir)["counts"][split]
  if kinds is None:
    return counts["total"]
  return sum(counts[k] for k in _kind_names(kinds))


CLASS_WEIGHTS_FILE = "class_weights.json"  # {"weights": {label: acceptance probability in (0, 1]}}


def read_class_weights(record_dir: str | os.PathLike, split: str) -> Optional[list[float]]:
  """Per label id of `split`, the sampling weight from record_dir/class_weights.json; None without
  the file. Written by governance (oclear_jax/governance/long_tail.py); a label it does not name
  gets weight 1 (never starved)."""
  path = paths.join(record_dir, CLASS_WEIGHTS_FILE)
  if not paths.exists(path):
    return None
  with paths.open(path) as f:
    weights = json.load(f)["weights"]
  with paths.open(paths.join(record_dir, records.LABELS_FILE)) as f:
    label_ids = json.load(f)[split]
  vector = [1.0] * len(label_ids)
  for label, index in label_ids.items():
    w = float(weights.get(label, 1.0))
    if not 0.0 < w <= 1.0:
      raise ValueError(f"{path}: weight {w} of label {label!r} must lie in (0, 1] (it is an acceptance "
                       "probability); rerun --mode=govern or delete the file")
    vector[index] = w
  return vector


def _kind_names(kinds: str | Sequence[str]) -> list[str]:
  kinds = [kinds] if isinstance(kinds, str) else list(kinds)
  unknown = [k for k in kinds if k not in records.KIND_IDS]
  if unknown:
    raise ValueError(f"unknown kinds {unknown}; expected some of {list(records.KIND_IDS)}")
  return kinds


def _parse(serialized: tf.Tensor) -> dict:
  ex = tf.io.parse_single_example(serialized, _FEATURES)
  return {
      "id": ex["id"],
      "image": ex["image"],
      "title": ex["title"],
      "title_tokens": tf.cast(tf.sparse.to_dense(ex["title_tokens"]), tf.int32),
      "label": tf.cast(ex["label"], tf.int32),
      "kind": tf.cast(ex["kind"], tf.int32),
  }


def make_dataset(record_dir: str | os.PathLike, split: str, *, batch_size: int,
                 preprocess: str, shuffle: bool, repeat: bool, seed: int = 0,
                 drop_remainder: bool = True, process_index: int = 0,
                 process_count: int = 1, cache_decoded: bool = False,
                 kinds: Optional[str | Sequence[str]] = None,
                 shuffle_buffer: int = 10_000, skip_examples: int = 0,
                 class_weights: Optional[Sequence[float]] = None) -> tf.data.Dataset:
  """Batches of {image f32[B,H,W,3], title_tokens i32[B,L], label i32[B], kind i32[B],
  id str[B], title str[B]} from one split, this process's share only.

  Args:
    record_dir: a directory written by `write_records`.
    split: 'train' or 'eval'.
    batch_size: per-process batch size.
    preprocess: pipe string of registered ops, e.g. 'decode|resize(64)|value_range'.
    shuffle: shuffle examples with `seed` (reshuffled each epoch, reproducibly).
    repeat: repeat forever.
    seed: base seed for shuffling and random preprocessing ops.
    drop_remainder: drop the last short batch (keeps shapes static for jit).
    process_index, process_count: this host's slice of the examples.
    cache_decoded: cache decoded images in memory; `preprocess` must start with
      'decode' (only the ops after it run each epoch). For small stored images.
    kinds: keep only 'doc' or 'query' examples (or a list of both).
    shuffle_buffer: examples in the shuffle buffer.
    skip_examples: start this far into the (shuffled, repeated) stream, as if that many
      examples had been read: a resumed run passes step * batch_size and sees exactly the
      batches an uninterrupted run would. Skipped examples are not augmented (their random
      ops are keyed by stream position, which the skip preserves).
    class_weights: per label id, the probability that an example of that label is kept
      (class-balanced sampling by rejection, see `read_class_weights`). Decided by a stateless
      draw keyed on (seed, position in the repeated stream), so the stream stays a function of
      the seed; skip_examples counts kept examples.
  """
  summary = read_summary(record_dir)
  if split not in summary["files"]:
    raise ValueError(f"split {split!r} not in {record_dir}; have {list(summary['files'])}")
  files = [paths.join(record_dir, f) for f in summary["files"][split]]

  ds = tf.data.Dataset.from_tensor_slices(files)
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 16),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.shard(process_count, process_index)
  ds = ds.map(_parse, num_parallel_calls=tf.data.AUTOTUNE)
  if kinds is not None:
    kind_ids = tf.constant([records.KIND_IDS[k] for k in _kind_names(kinds)], tf.int32)
    ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["kind"], kind_ids)))

  if cache_decoded:
    first, _, rest = preprocess.partition("|")
    if preprocess_ops.parse_op(first)[0] != "decode":
      raise ValueError(f"cache_decoded needs preprocess to start with 'decode', got "
                       f"{preprocess!r}")
    ds = ds.map(preprocess_ops.get_preprocess_fn(first), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.cache()
    preprocess = rest

  if shuffle:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  if class_weights is not None:
    accept = tf.constant(list(class_weights), tf.float32)
    draw_seed = tf.constant(seed + 0x5EED, tf.int64)  # Not the augmentation's (seed, index) pairs.

    def keep(index, ex):
      return tf.random.stateless_uniform([], seed=tf.stack([draw_seed, index])) < tf.gather(accept, ex["label"])

    def without_index(index, ex):
      del index
      return ex

    ds = ds.enumerate().filter(keep).map(without_index)
  preprocess_fn = preprocess_ops.get_preprocess_fn(preprocess)

  def with_seed(index, ex):
    ex["seed"] = tf.stack([tf.constant(seed, tf.int64), index])
    ex = preprocess_fn(ex)
    del ex["seed"]
    ex["image"] = tf.cast(ex["image"], tf.float32)
    return ex

  ds = ds.enumerate()
  if skip_examples:
    ds = ds.skip(skip_examples)
  ds = ds.map(with_seed, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds.prefetch(tf.data.AUTOTUNE)


def _preprocessed(serialized: tf.Tensor, position: tf.Tensor, *, preprocess_fn, seed: int) -> dict:
  """One example parsed and preprocessed; random ops draw from (seed, its global stream position)."""
  ex = _parse(serialized)
  ex["seed"] = tf.stack([tf.constant(seed, tf.int64), position])
  ex = preprocess_fn(ex)
  del ex["seed"]
  ex["image"] = tf.cast(ex["image"], tf.float32)
  return ex


def _batched_examples(chunks, *, preprocess: str, seed: int, batch_size: int,
                      drop_remainder: bool) -> tf.data.Dataset:
  """`chunks()` yields (serialized str[n], position i64[n]): the examples parsed, preprocessed and batched."""
  spec = (tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int64))
  ds = tf.data.Dataset.from_generator(chunks, output_signature=spec).prefetch(2)  # reads overlap decoding
  preprocess_fn = preprocess_ops.get_preprocess_fn(preprocess)
  ds = ds.unbatch().map(lambda s, p: _preprocessed(s, p, preprocess_fn=preprocess_fn, seed=seed),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def make_train_dataset(record_dir: str | os.PathLike, split: str = "train", *, global_batch_size: int,
                       preprocess: str, seed: int, start_step: int = 0, process_index: int = 0,
                       process_count: int = 1, class_weights: Optional[Sequence[float]] = None,
                       reader: Optional[random_access.RecordReader] = None) -> tf.data.Dataset:
  """Endless batches of this process's slice of global batches start_step, start_step + 1, ... (0-based).

  Global batch s holds the examples at positions s*B .. (s+1)*B - 1 of `global_order.GlobalOrder`;
  process p reads rows p*B/P .. (p+1)*B/P - 1 of it by index (the rows `jax.make_array_from_process_
  local_data` expects from it), so the processes' batches concatenated in process order are the
  global batch, equal for every process count, augmentation included (seeded by position). A run
  resumed from step k passes start_step=k: nothing before it is read. `reader`: for tests that count reads.
  """
  if global_batch_size % process_count:
    raise ValueError(f"config.train.batch_size={global_batch_size} must divide over {process_count} processes")
  reader = reader or random_access.RecordReader(record_dir, split)
  order = global_order.GlobalOrder(len(reader), seed, labels=reader.labels, class_weights=class_weights)
  local = global_batch_size // process_count

  def chunks():
    for step in itertools.count(start_step):
      first = step * global_batch_size + process_index * local
      positions = np.arange(first, first + local, dtype=np.int64)
      yield np.asarray(reader.read(order.examples(first, first + local)), object), positions

  return _batched_examples(chunks, preprocess=preprocess, seed=seed, batch_size=local, drop_remainder=True)


def make_share_dataset(record_dir: str | os.PathLike, split: str, *, batch_size: int, preprocess: str,
                       process_index: int = 0, process_count: int = 1, seed: int = 0,
                       reader: Optional[random_access.RecordReader] = None) -> tf.data.Dataset:
  """This process's examples p, p + P, ... of a split, once, in order (the last batch may be short).

  The round-robin share `distributed.host_gather.share_row_numbers` numbers rows by; example j is
  the j-th written (`random_access`), which is also `make_dataset`'s order. Only these examples are read.
  """
  reader = reader or random_access.RecordReader(record_dir, split)
  rows = np.arange(process_index, len(reader), process_count, dtype=np.int64)

  def chunks():
    for start in range(0, len(rows), batch_size):
      mine = rows[start:start + batch_size]
      yield np.asarray(reader.read(mine), object), mine

  return _batched_examples(chunks, preprocess=preprocess, seed=seed, batch_size=batch_size,
                           drop_remainder=False)


def numpy_batches(ds: tf.data.Dataset) -> Iterator[dict]:
  """Numpy dicts for the trainer (strings come back as bytes)."""
  return ds.as_numpy_iterator()
