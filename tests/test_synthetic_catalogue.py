"""Tests for the synthetic catalogue: format, determinism, split, planted noise."""

import collections
import csv
import dataclasses
import os
import pathlib

import ml_collections
import numpy as np
from PIL import Image
import pytest

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import synthetic_catalogue
from input_pipeline import synthetic_render

# Large noise fractions so that every kind of noise is planted several times.
NOISY = synthetic_catalogue.CatalogueSpec(
    num_products=30, image_size=48, queries_per_product=2, wrong_label_fraction=0.15,
    split_product_fraction=0.2, near_duplicate_fraction=0.1, corrupt_fraction=0.05,
    empty_title_fraction=0.1)


def _read(path: pathlib.Path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def noisy_root(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("synthetic") / "catalogue"
  synthetic_catalogue.generate_catalogue(root, NOISY, progress=False)
  return root


@pytest.fixture(scope="module")
def rows(noisy_root) -> list[dict[str, str]]:
  """Catalogue rows joined with their ground truth."""
  truth = {r["id"]: r for r in _read(noisy_root / "ground_truth.csv")}
  return [{**r, **truth[r["id"]]} for r in _read(noisy_root / "catalogue.csv")]


def _pixels(root: pathlib.Path, row: dict[str, str]) -> np.ndarray:
  return np.asarray(Image.open(root / row["image"]).convert("RGB"), np.float32)


def _shifted_distance(a: np.ndarray, b: np.ndarray, max_shift: int = 2) -> float:
  """Mean absolute luma difference under the best small translation.

  Luma because JPEG re-encoding smears the chroma of fine coloured patterns.
  """
  a, b = a @ np.float32([0.299, 0.587, 0.114]), b @ np.float32([0.299, 0.587, 0.114])
  m = max_shift
  core = a[m:-m, m:-m]
  return min(np.abs(core - b[m + dy:b.shape[0] - m + dy, m + dx:b.shape[1] - m + dx]).mean()
             for dy in range(-m, m + 1) for dx in range(-m, m + 1))


def test_same_spec_gives_identical_bytes(noisy_root, tmp_path):
  other = tmp_path / "again"
  synthetic_catalogue.generate_catalogue(other, NOISY, progress=False)
  for name in ("catalogue.csv", "ground_truth.csv", "catalogue.json"):
    assert (noisy_root / name).read_bytes() == (other / name).read_bytes(), name
  images = sorted(p.name for p in (noisy_root / "images").iterdir())
  assert images == sorted(p.name for p in (other / "images").iterdir())
  for name in images:
    assert (noisy_root / "images" / name).read_bytes() == (other / "images" / name).read_bytes()


def test_format_columns_kinds_and_splits(noisy_root, rows):
  with open(noisy_root / "catalogue.csv", newline="", encoding="utf-8") as f:
    assert next(csv.reader(f)) == ["id", "image", "title", "label", "kind", "split"]
  with open(noisy_root / "ground_truth.csv", newline="", encoding="utf-8") as f:
    assert next(csv.reader(f)) == ["id", "product", "true_label", "noise"]
  assert len({r["id"] for r in rows}) == len(rows)
  assert {r["kind"] for r in rows} == {"doc", "query"}
  assert {r["split"] for r in rows} == {"train", "eval"}
  for r in rows:
    assert r["id"][0] == r["kind"][0]  # d... for docs, q... for queries.
    assert (noisy_root / r["image"]).is_file()
  assert all(r["title"] == "" for r in rows if r["kind"] == "query")
  doc_titles = [r["title"] for r in rows if r["kind"] == "doc" and "empty_title" not in r["noise"]]
  assert all(doc_titles)
  assert {r["image"].rsplit(".", 1)[1] for r in rows} == {"jpg", "png"}
  queries = collections.Counter(r["product"] for r in rows if r["kind"] == "query")
  assert set(queries.values()) == {NOISY.queries_per_product}
  # The project's own reader accepts it as is.
  columns = catalogue_lib.CatalogueColumns(kind="kind", split="split")
  read = catalogue_lib.read_catalogue(noisy_root / "catalogue.csv", columns)
  assert read.counts["rows_kept"] == len(rows)


def test_titles_are_noisy_descriptions(rows):
  docs = collections.defaultdict(list)
  for r in rows:
    if r["kind"] == "doc" and r["title"] and "near_duplicate" not in r["noise"]:
      docs[r["product"]].append(r["title"])
  head = max(docs.values(), key=len)
  assert len(set(head)) > len(head) // 2  # The same product is listed many ways.


def test_eval_is_class_disjoint_and_clean(rows):
  by_split = {s: {r["product"] for r in rows if r["split"] == s} for s in ("train", "eval")}
  assert not by_split["train"] & by_split["eval"]
  assert len(by_split["eval"]) == round(NOISY.eval_fraction * NOISY.num_products)
  for r in rows:
    if r["split"] == "eval":
      assert r["noise"] == "" and r["label"] == r["true_label"], r


def test_train_noise_is_planted_as_recorded(noisy_root, rows):
  train = [r for r in rows if r["split"] == "train"]
  noise = collections.Counter(k for r in train for k in r["noise"].split(";") if k)
  base_docs = sum(r["kind"] == "doc" and "near_duplicate" not in r["noise"] for r in train)
  docs = base_docs + noise["near_duplicate"]
  expected = {"near_duplicate": NOISY.near_duplicate_fraction * base_docs,
              "wrong_label": NOISY.wrong_label_fraction * docs,
              "empty_title": NOISY.empty_title_fraction * docs,
              "corrupt": NOISY.corrupt_fraction * len(train)}
  for kind, count in expected.items():
    assert noise[kind] >= 1 and abs(noise[kind] - count) <= max(2, 0.25 * count), (
        kind, noise, expected)
  assert noise["split_id"] >= 2
  train_labels = {r["true_label"] for r in train}
  products_of_label = collections.defaultdict(set)
  for r in rows:
    products_of_label[r["label"]].add(r["product"])
  for r in train:
    kinds = r["noise"].split(";")
    if "wrong_label" in kinds:
      assert r["label"] != r["true_label"] and r["label"] in train_labels
    elif "split_id" in kinds:
      assert r["label"] != r["true_label"] and r["label"] not in train_labels
      assert products_of_label[r["label"]] == {r["product"]}
    else:
      assert r["label"] == r["true_label"]
    if "empty_title" in kinds:
      assert r["title"] == ""
    if "near_duplicate" in kinds and "corrupt" not in kinds:  # A near copy of a doc.
      pixels = _pixels(noisy_root, r)
      others = [o for o in rows if o["product"] == r["product"] and o["kind"] == "doc"
                and o["id"] != r["id"] and "corrupt" not in o["noise"]]
      assert min(_shifted_distance(pixels, _pixels(noisy_root, o)) for o in others) < 6


def test_class_sizes_are_skewed(rows):
  docs = collections.Counter(
      r["product"] for r in rows if r["kind"] == "doc" and "near_duplicate" not in r["noise"])
  sizes = np.array(list(docs.values()))
  assert sizes.min() >= NOISY.docs_per_product[0]
  assert sizes.max() <= NOISY.max_docs_per_product
  assert sizes.max() >= 3 * np.median(sizes)


def test_queries_differ_more_from_docs_than_docs_do(noisy_root, rows):
  clean = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in rows:
    if r["noise"] in ("", "empty_title"):
      clean[r["product"]][r["kind"]].append(r)
  doc_doc, query_doc = [], []
  for kinds in clean.values():
    if len(kinds["doc"]) >= 2 and kinds["query"]:
      anchor = _pixels(noisy_root, kinds["doc"][0])
      doc_doc.append(np.abs(_pixels(noisy_root, kinds["doc"][1]) - anchor).mean())
      query_doc.append(np.abs(_pixels(noisy_root, kinds["query"][0]) - anchor).mean())
  assert len(doc_doc) >= 10
  assert np.mean(np.array(query_doc) > np.array(doc_doc)) >= 0.9
  assert np.median(query_doc) > 2 * np.median(doc_doc)


def test_corrupt_rows_do_not_decode_and_others_do(noisy_root, rows):
  corrupt = [r for r in rows if "corrupt" in r["noise"]]
  assert corrupt
  for r in corrupt:
    with pytest.raises(Exception):
      with Image.open(noisy_root / r["image"]) as image:
        image.load()
  for r in rows:
    if "corrupt" not in r["noise"]:
      with Image.open(noisy_root / r["image"]) as image:
        assert image.size == (NOISY.image_size, NOISY.image_size)


def test_rerun_is_idempotent_and_other_spec_refused(noisy_root):
  stamps = {p: p.stat().st_mtime_ns for p in noisy_root.rglob("*")}
  summary = synthetic_catalogue.generate_catalogue(noisy_root, NOISY, progress=False)
  assert summary["spec"] == NOISY.to_json()
  assert {p: p.stat().st_mtime_ns for p in noisy_root.rglob("*")} == stamps
  other = synthetic_catalogue.CatalogueSpec(**{**NOISY.to_json(), "seed": 1})
  with pytest.raises(ValueError, match="different spec.*overwrite=True"):
    synthetic_catalogue.generate_catalogue(noisy_root, other, progress=False)
  assert {p: p.stat().st_mtime_ns for p in noisy_root.rglob("*")} == stamps


def test_overwrite_and_foreign_directory(tmp_path):
  small = synthetic_catalogue.CatalogueSpec(num_products=4, image_size=32, max_docs_per_product=6)
  root = tmp_path / "cat"
  synthetic_catalogue.generate_catalogue(root, small, progress=False)
  bigger = dataclasses.replace(small, num_products=5)
  summary = synthetic_catalogue.generate_catalogue(root, bigger, overwrite=True, progress=False)
  assert summary["num_products"] == 5
  assert sorted(os.listdir(tmp_path)) == ["cat"]  # No temp directory left behind.
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not empty"):
    synthetic_catalogue.generate_catalogue(foreign, small, overwrite=True, progress=False)
  assert (foreign / "notes.txt").read_text() == "keep me"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(synthetic_render, "render_query", fail)
  spec = synthetic_catalogue.CatalogueSpec(num_products=4, image_size=32, max_docs_per_product=6)
  with pytest.raises(KeyboardInterrupt):
    synthetic_catalogue.generate_catalogue(tmp_path / "cat", spec, progress=False)
  assert os.listdir(tmp_path) == []


def test_spec_from_config_dict():
  cfg = ml_collections.ConfigDict(dict(num_products=12, image_size=32, seed=3))
  spec = synthetic_catalogue.CatalogueSpec(**dict(cfg))
  assert (spec.num_products, spec.image_size, spec.seed) == (12, 32, 3)
  with pytest.raises(TypeError, match="num_product"):
    synthetic_catalogue.CatalogueSpec(num_product=12)
  with pytest.raises(ValueError, match="wrong_label_fraction"):
    synthetic_catalogue.CatalogueSpec(wrong_label_fraction=1.5)
  with pytest.raises(ValueError, match="docs_per_product"):
    synthetic_catalogue.CatalogueSpec(docs_per_product=(5, 2))


def test_cli(tmp_path, capsys):
  synthetic_catalogue.main(["--root", str(tmp_path / "cli"), "--num_products", "3",
                            "--image_size", "32", "--max_docs_per_product", "6"])
  assert '"num_products": 3' in capsys.readouterr().out
  assert (tmp_path / "cli" / "catalogue.json").exists()
