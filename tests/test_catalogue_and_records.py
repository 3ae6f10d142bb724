"""Catalogue reading, tokenization and record writing on a tiny planted catalogue."""

import json

import numpy as np
import pytest

from input_pipeline import catalogue
from input_pipeline import tokenizer as tokenizer_lib
import tiny_catalogue

COLUMNS = catalogue.CatalogueColumns(kind="kind", split="split")


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
  return tiny_catalogue.make_tiny_catalogue(tmp_path_factory.mktemp("catalogue"))


@pytest.fixture(scope="module")
def read(csv_path):
  return catalogue.read_catalogue(csv_path, COLUMNS)


@pytest.fixture(scope="module")
def title_tokenizer(read):
  return tokenizer_lib.TitleTokenizer.train([r.title for r in read.rows], vocab_size=200)


def test_reader_counts(read):
  c = read.counts
  n = tiny_catalogue.NUM_GOOD_ROWS
  assert c["rows_read"] == n + tiny_catalogue.NUM_EMPTY_FIELD_ROWS
  assert c["rows_kept"] == len(read.rows) == n
  assert (c["skipped_empty_id"], c["skipped_empty_image"], c["skipped_empty_label"]) == (1, 1, 1)
  assert c["non_utf8_rows"] == 1
  assert c["empty_titles"] == 1
  assert (c["doc"], c["query"]) == (12, 24)
  assert (c["train"], c["eval"]) == (24, 12)
  by_id = {r.id: r for r in read.rows}
  assert by_id[tiny_catalogue.NON_UTF8_ID].title == "caf\ufffd chair"
  assert len(by_id[tiny_catalogue.LONG_TITLE_ID].title) > 9000
  assert all(r.image_path.startswith("/") for r in read.rows)
  assert by_id["p00_d"].image_path.endswith("/images/p00_d.jpg")


def test_missing_column_names_column_and_file(csv_path):
  with pytest.raises(ValueError) as e:
    catalogue.read_catalogue(csv_path, catalogue.CatalogueColumns(title="titel"))
  msg = str(e.value)
  assert "'titel'" in msg and str(csv_path) in msg and "config.data.columns.title" in msg


def test_duplicate_ids_raise_with_lines(tmp_path):
  path = tmp_path / "dup.csv"
  path.write_text("id,image,title,label\na,x.jpg,t,1\nb,y.jpg,t,1\na,z.jpg,t,2\n")
  with pytest.raises(ValueError, match=r"'a' appears on line 2 and line 4"):
    catalogue.read_catalogue(path)


def test_max_rows_and_default_kind(csv_path):
  result = catalogue.read_catalogue(csv_path, catalogue.CatalogueColumns(), max_rows=5)
  assert result.counts["rows_read"] == 5
  assert {r.kind for r in result.rows} == {"doc"}


def test_hash_split_is_class_disjoint_and_stable(csv_path):
  cols = catalogue.CatalogueColumns(kind="kind")
  a = catalogue.read_catalogue(csv_path, cols, eval_fraction=0.5, split_seed=3)
  b = catalogue.read_catalogue(csv_path, cols, eval_fraction=0.5, split_seed=3)
  train = {r.label for r in a.rows if r.split == "train"}
  evals = {r.label for r in a.rows if r.split == "eval"}
  assert train and evals and not train & evals
  assert [r.split for r in a.rows] == [r.split for r in b.rows]


def test_tokenizer_known_ids_and_round_trip(title_tokenizer, tmp_path):
  tok = title_tokenizer
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)
  ids = tok.encode_batch(["Product Shirt", "", "long " * 2000], max_len=8)
  assert ids.dtype == np.int32 and ids.shape == (3, 8)
  n = 2 + len(tok.tokenize("Product Shirt"))
  assert ids[0, 0] == 2 and ids[0, n - 1] == 3 and (ids[0, n:] == 0).all()
  assert ids[1, :3].tolist() == [2, 3, 0]  # Empty title -> [CLS][SEP].
  assert ids[2, 0] == 2 and ids[2, -1] == 3 and (ids[2, 1:-1] > 3).all()  # Truncated.
  assert tok.decode(ids[0]) == "product shirt"
  tok.save(tmp_path)
  again = tokenizer_lib.TitleTokenizer.load(tmp_path)
  np.testing.assert_array_equal(again.encode_batch(["Product Shirt"], 8), ids[:1])
  # A BERT vocab.txt loads too (ids follow line order).
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nblue\nshirt\n##s\n")
  vocab = tokenizer_lib.TitleTokenizer.load(tmp_path / "vocab.txt")
  assert vocab.encode_batch(["Blue shirts red"], 7)[0].tolist() == [2, 4, 5, 6, 1, 3, 0]


def test_tokenizer_training_is_deterministic(read):
  titles = [r.title for r in read.rows]
  a = tokenizer_lib.TitleTokenizer.train(titles, vocab_size=200)
  b = tokenizer_lib.TitleTokenizer.train(titles, vocab_size=200)
  assert a.to_json() == b.to_json()


@pytest.fixture(scope="module")
def written(read, title_tokenizer, tmp_path_factory):
  from input_pipeline import records  # pylint: disable=g-import-not-at-top  # TF import.
  out = tmp_path_factory.mktemp("records") / "recs"
  summary = records.write_records(read.rows, out, tokenizer=title_tokenizer,
                                  max_title_len=16, num_shards=3, progress=False)
  return out, summary


def test_records_skip_exactly_the_bad_images(written):
  out, summary = written
  skipped = [json.loads(l) for l in (out / "skipped.jsonl").read_text().splitlines()]
  assert {s["id"]: s["reason"] for s in skipped} == tiny_catalogue.BAD_IMAGES
  assert summary["skipped"] == {r: 1 for r in tiny_catalogue.BAD_IMAGES.values()}
  assert summary["counts"]["train"] == {"doc": 8, "query": 12, "total": 20}
  assert summary["counts"]["eval"] == {"doc": 4, "query": 8, "total": 12}
  assert summary["num_classes"] == {"train": 8, "eval": 4}
  assert len(summary["files"]["train"]) == 3
  labels = json.loads((out / "labels.json").read_text())
  assert labels["train"] == {f"cat{i:02d}": i for i in range(8)}
  assert labels["eval"] == {f"cat{i:02d}": i - 8 for i in range(8, 12)}
  assert (out / "tokenizer.json").exists()
  assert not list(out.parent.glob(".recs.tmp-*"))


def test_records_are_idempotent(written, read, title_tokenizer):
  from input_pipeline import records  # pylint: disable=g-import-not-at-top
  out, summary = written
  mtime = (out / "records.json").stat().st_mtime_ns
  again = records.write_records(read.rows, out, tokenizer=title_tokenizer,
                                max_title_len=16, num_shards=3, progress=False)
  assert again == summary and (out / "records.json").stat().st_mtime_ns == mtime


def test_images_convert_to_rgb(written):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out, _ = written
  seen = {}
  for f in sorted(out.glob("*.tfrecord")):
    for raw in tf.data.TFRecordDataset(str(f)):
      ex = tf.train.Example.FromString(raw.numpy()).features.feature
      row_id = ex["id"].bytes_list.value[0].decode()
      if row_id in tiny_catalogue.CONVERTED:
        seen[row_id] = tf.io.decode_jpeg(ex["image"].bytes_list.value[0]).shape
  assert seen == {k: (24, 32, 3) for k in tiny_catalogue.CONVERTED}


def test_a_val_split_is_written_not_dropped(read, title_tokenizer, tmp_path):
  """Rows marked 'val' (training products held out for checkpoint selection) get their own shards."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from input_pipeline import records  # pylint: disable=g-import-not-at-top
  rows = [dataclasses.replace(r, split="val") if r.split == "train" and r.label in ("cat00", "cat01") else r
          for r in read.rows]
  summary = records.write_records(rows, tmp_path / "recs", tokenizer=title_tokenizer, max_title_len=16,
                                  num_shards=2, progress=False)
  bad = set(tiny_catalogue.BAD_IMAGES)
  val_rows = [r for r in rows if r.split == "val" and r.id not in bad]
  assert val_rows and summary["counts"]["val"]["total"] == len(val_rows)
  assert sum(c["total"] for c in summary["counts"].values()) == len([r for r in rows if r.id not in bad])
  assert summary["files"]["val"] and summary["num_classes"]["val"] == 2
