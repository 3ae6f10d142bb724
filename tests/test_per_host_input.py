"""Per-host input (issue 15 part 3): each process reads its slice of each global batch by index.

Processes are simulated by process_index/process_count arguments in one test process: the
input functions take them as plain arguments (the trainer passes jax.process_index/count).
"""
import collections
import json

import jax
import numpy as np
import pytest

from input_pipeline import catalogue
from input_pipeline import global_order
from input_pipeline import pipeline
from input_pipeline import random_access
from input_pipeline import records
from input_pipeline import tokenizer as tokenizer_lib
from oclear_jax.distributed import host_gather
import tiny_catalogue

AUGMENT = "decode|random_resized_crop(16)|flip_lr|color_jitter|value_range(-1, 1)"
PLAIN = "decode|resize(16)|value_range(-1, 1)"
BATCH = 6  # divides over 1, 2 and 3 processes; 20 training examples: batches straddle epochs
SEED = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("per_host")
  read = catalogue.read_catalogue(tiny_catalogue.make_tiny_catalogue(root),
                                  catalogue.CatalogueColumns(kind="kind", split="split"))
  tok = tokenizer_lib.TitleTokenizer.train([r.title for r in read.rows], vocab_size=200)
  out = root / "records"
  records.write_records(read.rows, out, tokenizer=tok, max_title_len=12, num_shards=3, progress=False)
  return out, read.rows


class LoggingReader(random_access.RecordReader):
  """Remembers every example index it reads, in order."""

  def __init__(self, *args):
    super().__init__(*args)
    self.log = []

  def read(self, indices):
    self.log += np.asarray(indices).tolist()
    return super().read(indices)


def _batches(record_dir, steps, *, process_index=0, process_count=1, start_step=0, reader=None, **kwargs):
  ds = pipeline.make_train_dataset(record_dir, global_batch_size=BATCH, preprocess=AUGMENT, seed=SEED,
                                   start_step=start_step, process_index=process_index,
                                   process_count=process_count, reader=reader, **kwargs)
  return list(ds.take(steps).as_numpy_iterator())


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("count", [2, 3])
def test_global_batches_are_the_same_for_any_process_count(tiny, count):
  """Hosts' batches concatenated in process order == 1 process's, augmented pixels bit for bit."""
  record_dir, _ = tiny
  steps = 8  # 48 positions: 2.4 epochs of 20 examples
  one = _batches(record_dir, steps)
  hosts = [_batches(record_dir, steps, process_index=p, process_count=count) for p in range(count)]
  for s in range(steps):
    _assert_same(one[s], {k: np.concatenate([h[s][k] for h in hosts]) for k in one[s]})
  assert one[0]["image"].shape == (BATCH, 16, 16, 3) and not np.array_equal(one[0]["image"], one[1]["image"])


@pytest.mark.parametrize("count", [1, 2, 3])
def test_host_slices_are_disjoint_and_cover_every_epoch(tiny, count):
  record_dir, _ = tiny
  steps, num = 10, pipeline.count_examples(record_dir, "train")  # 60 positions = 3 epochs of 20
  ids_at = {}  # global stream position -> id, from each host's own batches
  for p in range(count):
    reader = LoggingReader(record_dir, "train")
    local = BATCH // count
    for s, batch in enumerate(_batches(record_dir, steps, process_index=p, process_count=count, reader=reader)):
      for i, example_id in enumerate(batch["id"]):
        position = s * BATCH + p * local + i
        assert position not in ids_at  # no position is read by two hosts
        ids_at[position] = example_id
    # this host read only its rows: what it logged is its slices, in order (prefetching reads ahead)
    mine = [j for s in range(len(reader.log) // local) for j in range(s * BATCH + p * local, s * BATCH + (p + 1) * local)]
    order = global_order.GlobalOrder(num, SEED)
    assert reader.log == np.concatenate([order.examples(j, j + 1) for j in mine]).tolist()
  assert sorted(ids_at) == list(range(steps * BATCH))
  for epoch in range(3):  # each epoch: every example exactly once, over all hosts together
    epoch_ids = [ids_at[j] for j in range(epoch * num, (epoch + 1) * num)]
    assert len(set(epoch_ids)) == num


def test_resumed_input_reads_nothing_before_its_step(tiny):
  record_dir, _ = tiny
  uninterrupted = _batches(record_dir, 7)
  resumed_at = 4
  reader = LoggingReader(record_dir, "train")
  resumed = _batches(record_dir, 3, start_step=resumed_at, reader=reader)
  for a, b in zip(uninterrupted[resumed_at:], resumed):
    _assert_same(a, b)
  order = global_order.GlobalOrder(len(reader), SEED)
  first = resumed_at * BATCH
  # the reads start at the resumed step's first example and run on from there: no replay
  assert reader.log == order.examples(first, first + len(reader.log)).tolist()
  assert reader.examples_read == len(reader.log) <= 8 * BATCH

  far = LoggingReader(record_dir, "train")  # a step a replay would need 60,000 reads to reach
  next(iter(_batches(record_dir, 1, start_step=10_000, reader=far, process_index=1, process_count=2)))
  assert far.examples_read <= 8 * BATCH // 2


def test_balanced_sampling_is_per_position_and_resumes(tiny):
  record_dir, _ = tiny
  reader = random_access.RecordReader(record_dir, "train")
  weights = [1.0, 0.2] + [0.6] * 6
  one = _batches(record_dir, 6, class_weights=weights)
  two = [_batches(record_dir, 6, process_index=p, process_count=2, class_weights=weights) for p in range(2)]
  resumed = _batches(record_dir, 2, start_step=4, class_weights=weights)
  for s in range(6):
    _assert_same(one[s], {k: np.concatenate([h[s][k] for h in two]) for k in one[s]})
  for a, b in zip(one[4:], resumed):
    _assert_same(a, b)
  # the stream's label shares follow n_c * w_c / sum(n * w), as rejection sampling does
  labels = reader.labels
  order = global_order.GlobalOrder(len(labels), SEED, labels=labels, class_weights=weights)
  drawn = np.bincount(labels[order.examples(0, 40_000)], minlength=len(weights))
  n = np.bincount(labels, minlength=len(weights))
  expected = n * np.array(weights) / (n * np.array(weights)).sum()
  assert drawn / drawn.sum() == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_eval_shares_are_round_robin_rows_as_host_gather_numbers_them(tiny, count, monkeypatch):
  record_dir, _ = tiny
  source = np.concatenate([b["id"] for b in pipeline.make_dataset(
      record_dir, "eval", batch_size=5, preprocess=PLAIN, shuffle=False, repeat=False,
      drop_remainder=False).as_numpy_iterator()])
  seen = []
  monkeypatch.setattr(jax, "process_count", lambda: count)
  for p in range(count):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    reader = random_access.RecordReader(record_dir, "eval")
    ids = np.concatenate([b["id"] for b in pipeline.make_share_dataset(
        record_dir, "eval", batch_size=2, preprocess=PLAIN, process_index=p, process_count=count,
        reader=reader).as_numpy_iterator()])
    assert ids.tolist() == source[host_gather.share_row_numbers(0, len(ids))].tolist()
    assert reader.examples_read == len(ids) == len(range(p, len(source), count))  # only its own rows
    seen += ids.tolist()
  assert collections.Counter(seen) == collections.Counter(source.tolist())


def test_records_load_as_a_tfds_dataset_with_the_curated_categories(tiny):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  record_dir, rows = tiny
  builder = tfds.builder_from_directory(str(record_dir))
  summary = pipeline.read_summary(record_dir)
  labels = json.loads((record_dir / records.LABELS_FILE).read_text())
  by_id = {r.id: r for r in rows}
  assert set(builder.info.splits) == set(summary["files"])
  for split in summary["files"]:
    loaded = list(builder.as_dataset(split=split).as_numpy_iterator())
    assert builder.info.splits[split].num_examples == len(loaded) == summary["counts"][split]["total"]
    streamed = {i: b for b in pipeline.make_dataset(record_dir, split, batch_size=1, preprocess="decode",
                                                    shuffle=False, repeat=False).as_numpy_iterator()
                for i in b["id"]}
    for ex in loaded:
      row = by_id[ex["id"].decode()]
      assert ex["category"].decode() == row.label and labels[split][row.label] == ex["label"]
      assert row.split == split and builder.info.features["kind"].int2str(ex["kind"]) == row.kind
      np.testing.assert_array_equal(ex["image"], streamed[ex["id"]]["image"][0].astype(np.uint8))
      np.testing.assert_array_equal(ex["title_tokens"], streamed[ex["id"]]["title_tokens"][0])


def test_records_without_an_index_name_the_fix(tiny, tmp_path):
  record_dir, _ = tiny
  (tmp_path / records.SUMMARY_FILE).write_text((record_dir / records.SUMMARY_FILE).read_text())
  with pytest.raises(FileNotFoundError, match=r"train.index.npy not found.*rerun --mode=prepare"):
    random_access.RecordReader(tmp_path, "train")
