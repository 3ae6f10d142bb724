"""tf.data pipeline and preprocessing ops over records of the tiny planted catalogue."""

import csv
import json

import numpy as np
import pytest

from input_pipeline import catalogue
from input_pipeline import pipeline
from input_pipeline import preprocess_ops
from input_pipeline import records
from input_pipeline import tokenizer as tokenizer_lib
import tiny_catalogue

MAX_LEN = 12
PLAIN = "decode|resize(16)|value_range(-1, 1)"
AUGMENT = "decode|random_resized_crop(16)|flip_lr|color_jitter|value_range(-1, 1)"


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("catalogue")
  csv_path = tiny_catalogue.make_tiny_catalogue(root)
  read = catalogue.read_catalogue(
      csv_path, catalogue.CatalogueColumns(kind="kind", split="split"))
  tok = tokenizer_lib.TitleTokenizer.train([r.title for r in read.rows], vocab_size=200)
  out = root / "records"
  records.write_records(read.rows, out, tokenizer=tok, max_title_len=MAX_LEN,
                        num_shards=2, progress=False)
  return out


def _all(record_dir, split, **kwargs):
  kwargs = dict(batch_size=1, preprocess=PLAIN, shuffle=False, repeat=False,
                drop_remainder=False) | kwargs
  batches = list(pipeline.numpy_batches(pipeline.make_dataset(record_dir, split, **kwargs)))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_shapes_and_dtypes(record_dir):
  ds = pipeline.make_dataset(record_dir, "train", batch_size=8, preprocess=AUGMENT,
                             shuffle=True, repeat=False)
  batches = list(pipeline.numpy_batches(ds))
  assert len(batches) == 20 // 8  # drop_remainder drops the short batch.
  b = batches[0]
  assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["title_tokens"].shape == (8, MAX_LEN) and b["title_tokens"].dtype == np.int32
  for key in ("label", "kind"):
    assert b[key].shape == (8,) and b[key].dtype == np.int32
  assert b["id"].shape == (8,) and b["id"].dtype == object
  assert b["title"].shape == (8,)
  assert pipeline.count_examples(record_dir, "train") == 20
  assert pipeline.count_examples(record_dir, "eval", kinds="query") == 8


def test_labels_decode_back_to_csv_labels(record_dir):
  labels = json.loads((record_dir / "labels.json").read_text())
  for split in ("train", "eval"):
    inverse = {v: k for k, v in labels[split].items()}
    got = _all(record_dir, split)
    for row_id, label in zip(got["id"], got["label"]):
      # Tiny catalogue ids are p{category}_..., labels cat{category}.
      assert inverse[int(label)] == "cat" + row_id.decode()[1:3]


def test_titles_and_tokens_survive(record_dir):
  got = _all(record_dir, "train")
  titles = dict(zip([i.decode() for i in got["id"]], got["title"]))
  tokens = dict(zip([i.decode() for i in got["id"]], got["title_tokens"]))
  assert titles[tiny_catalogue.EMPTY_TITLE_ID] == b""
  assert tokens[tiny_catalogue.EMPTY_TITLE_ID][:3].tolist() == [2, 3, 0]
  assert titles[tiny_catalogue.NON_UTF8_ID].decode() == "caf\ufffd chair"


def test_same_seed_same_batches(record_dir):
  def first(seed):
    ds = pipeline.make_dataset(record_dir, "train", batch_size=6, preprocess=AUGMENT,
                               shuffle=True, repeat=True, seed=seed)
    return next(pipeline.numpy_batches(ds))
  a, b, c = first(1), first(1), first(2)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["image"], c["image"])


def test_process_shards_partition_the_examples(record_dir):
  everything = set(_all(record_dir, "train")["id"])
  parts = [set(_all(record_dir, "train", process_index=i, process_count=2)["id"])
           for i in range(2)]
  assert not parts[0] & parts[1]
  assert parts[0] | parts[1] == everything and len(everything) == 20


def test_kinds_filter_and_cache(record_dir):
  queries = _all(record_dir, "eval", kinds="query", cache_decoded=True)
  assert len(queries["id"]) == 8 and set(queries["kind"]) == {1}
  docs = _all(record_dir, "eval", kinds=["doc"])
  assert len(docs["id"]) == 4 and set(docs["kind"]) == {0}


def test_unknown_op_names_it_and_the_registry():
  with pytest.raises(ValueError, match=r"'blur'.*decode.*value_range"):
    preprocess_ops.get_preprocess_fn("decode|blur(3)")


def test_op_parsing():
  assert preprocess_ops.parse_op("value_range(-1, 1)") == ("value_range", (-1, 1), {})
  assert preprocess_ops.parse_op("random_resized_crop(64, scale_min=0.3)") == (
      "random_resized_crop", (64,), {"scale_min": 0.3})
  assert preprocess_ops.parse_op("flip_lr") == ("flip_lr", (), {})


def test_real_catalogue_batch(fashion_dir, tmp_path):
  with open(fashion_dir / "meta.csv", encoding="utf-8") as f:
    header = next(csv.reader(f))
  assert "productDisplayName" in header
  cols = catalogue.CatalogueColumns(id="id", image="image", title="productDisplayName",
                                    label="articleType")
  read = catalogue.read_catalogue(fashion_dir / "meta.csv", cols, max_rows=200)
  assert read.counts["rows_read"] == 200
  tok = tokenizer_lib.TitleTokenizer.train([r.title for r in read.rows], vocab_size=500)
  summary = records.write_records(read.rows, tmp_path / "recs", tokenizer=tok,
                                  max_title_len=16, num_shards=2, stored_image_size=64,
                                  progress=False)
  assert summary["counts"]["train"]["total"] >= 16
  ds = pipeline.make_dataset(tmp_path / "recs", "train", batch_size=16, preprocess=PLAIN,
                             shuffle=True, repeat=True)
  batch = next(pipeline.numpy_batches(ds))
  assert batch["image"].shape == (16, 16, 16, 3)
  assert (batch["title_tokens"][:, 0] == tok.cls_id).all()
  assert np.isfinite(batch["image"]).all()
