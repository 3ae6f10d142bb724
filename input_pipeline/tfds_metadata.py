"""TFDS metadata beside the curated records, so `tfds.builder_from_directory(records_dir)` loads them.

The shards stay the records' own TFRecords (`{split}-{i:05d}-of-{n:05d}.tfrecord`, one
tf.train.Example per row): TFDS reads them through a filename template, no copy is written.
What TFDS needs is dataset_info.json and features.json, written here with the shard lengths the
record writer counted (no second pass over the files). Each example holds:

  id, title, category  text (category: the curated label's name, e.g. governance's merged class)
  image                JPEG decoded to uint8[H, W, 3]
  title_tokens         int64[L] of the records' tokenizer (tokenizer.json)
  label                int64: the category's index in labels.json[split] (train and eval ids differ:
                       eval categories are unseen products, so `label` is no TFDS ClassLabel)
  kind                 ClassLabel doc / query
"""
from __future__ import annotations

import os
import pathlib

DATASET_NAME = "oclear_records"
FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"  # records.shard_name's layout
KIND_NAMES = ("doc", "query")  # the order of records.KIND_IDS


def features():
  """The records' tf.train.Example layout as TFDS feature connectors."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (TF is heavy; only when writing)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only when writing)
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "title": tfds.features.Text(),
      "title_tokens": tfds.features.Tensor(shape=(None,), dtype=tf.int64),
      "label": tfds.features.Scalar(dtype=tf.int64),
      "category": tfds.features.Text(),
      "kind": tfds.features.ClassLabel(names=list(KIND_NAMES)),
  })


def write_metadata(record_dir: str | os.PathLike, shard_lengths: dict[str, list[int]]) -> None:
  """dataset_info.json and features.json for the shards of `shard_lengths` ({split: examples per shard})."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only when writing)
  record_dir = pathlib.Path(record_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=record_dir, template=FILENAME_TEMPLATE,
                                           dataset_name=DATASET_NAME, filetype_suffix="tfrecord")
  split_infos = []
  for split, lengths in shard_lengths.items():
    split_template = template.replace(split=split)
    num_bytes = sum(os.path.getsize(split_template.sharded_filepath(shard_index=i, num_shards=len(lengths)))
                    for i in range(len(lengths)))
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=list(lengths), num_bytes=num_bytes,
                                           filename_template=split_template))
  tfds.folder_dataset.write_metadata(
      data_dir=record_dir, features=features(), split_infos=split_infos, filename_template=template,
      check_data=False, description="Curated catalogue records of oclear_jax (input_pipeline/records.py): "
      "category is the curated label's name; label its index in labels.json[split].")
