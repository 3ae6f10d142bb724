"""`--mode=govern` end to end on a catalogue with planted bad input: counted, logged, never lost.

Planted on top of a small built-in catalogue: documents whose image is missing, empty, not an
image or truncated; an empty title; a label with a single item; a label whose titles conflict;
CSV rows without a label. Then the curated catalogue feeds the records that training reads.
"""
import csv
import io
import json
import pathlib

import ml_collections
from PIL import Image
import pytest

from input_pipeline import pipeline
from input_pipeline import synthetic_catalogue
from oclear_jax import config_schema
from oclear_jax.commands import govern

SPEC = synthetic_catalogue.CatalogueSpec(num_products=30, image_size=32)
BAD_IMAGES = {"bad_missing": "missing", "bad_empty": "empty_file", "bad_text": "not_an_image",
              "bad_truncated": "truncated"}


def _plant_bad_input(root: pathlib.Path) -> dict[str, str]:
  """Appends bad rows to root/catalogue.csv; returns {what: id or label}."""
  with open(root / "catalogue.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  docs = [r for r in rows if r["kind"] == "doc" and r["split"] == "train" and r["title"]]
  by_label = {}
  for r in docs:
    by_label.setdefault(r["label"], []).append(r)
  label = max(by_label, key=lambda k: len(by_label[k]))
  template = by_label[label][0]
  extra = []
  for row_id, reason in BAD_IMAGES.items():
    path = root / "images" / f"{row_id}.jpg"
    if reason == "empty_file":
      path.write_bytes(b"")
    elif reason == "not_an_image":
      path.write_text("not a picture\n")
    elif reason == "truncated":
      buffer = io.BytesIO()
      Image.new("RGB", (256, 256), (200, 30, 30)).save(buffer, format="JPEG")
      path.write_bytes(buffer.getvalue()[:300])
    extra.append({**template, "id": row_id, "image": f"images/{row_id}.jpg"})
  def shifted_copy(source: dict[str, str], row_id: str) -> str:
    """A re-encoded, slightly brighter copy: new bytes (not an exact duplicate), same product."""
    with Image.open(root / source["image"]) as image:
      copy = Image.eval(image.convert("RGB"), lambda v: min(255, v + 3))
    copy.save(root / "images" / f"{row_id}.png")
    return f"images/{row_id}.png"

  extra.append({**template, "id": "bad_no_title", "title": "",
                "image": shifted_copy(by_label[label][1], "bad_no_title")})
  extra.append({**template, "id": "odd_title", "title": "zzqx vvkj wwpf",
                "image": shifted_copy(by_label[label][2], "odd_title")})
  Image.new("RGB", (32, 32), (10, 200, 120)).save(root / "images" / "lonely.png")
  extra.append({**template, "id": "lonely", "label": "lonely_label", "title": "a one-off product",
                "image": "images/lonely.png"})
  extra.append({**template, "id": "no_label", "label": ""})
  with open(root / "catalogue.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows + extra)
  return {"conflicting_label": label}


@pytest.fixture(scope="module")
def governed(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("govern")
  root = workdir / "raw"
  synthetic_catalogue.generate_catalogue(root, SPEC, progress=False)
  planted = _plant_bad_input(root)
  config = config_schema.base_config()
  config.data.source = "csv"
  config.data.root = str(root)
  config.data.columns.update(dict(kind="kind", split="split"))
  config.data.num_shards = 1
  config.data.stored_image_size = 32
  config.governance.update(dict(image_features="pixels", executor="in_process"))
  out = govern.run(config, str(workdir), progress=False)
  return workdir, out, planted, config


def _read(path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def test_bad_input_is_counted_and_logged(governed):
  workdir, out, planted, _ = governed
  out_dir = workdir / "governance"
  decisions = {r["id"]: r for r in _read(out_dir / "decisions.csv")}
  raw_ids = [r["id"] for r in _read(workdir / "raw" / "catalogue.csv") if r["label"]]
  assert sorted(decisions) == sorted(raw_ids)  # One decision per readable row, none lost.
  for row_id, reason in BAD_IMAGES.items():
    d = decisions[row_id]
    assert d["action"] == "dropped" and d["step"] == "featurize" and reason in d["reason"], d
  summary = json.loads((out_dir / "summary.json").read_text())
  counts = summary["counts"]
  assert counts["unreadable_images"] == {reason: 1 for reason in BAD_IMAGES.values()}
  assert summary["reader"]["skipped_empty_label"] == 1  # The CSV row without a label: counted by the reader.
  assert counts["empty_titles"] >= 1 and decisions["bad_no_title"]["action"] != "dropped"
  assert counts["singleton_labels"] >= 1
  assert planted["conflicting_label"] in counts["conflicting_title_examples"]
  report = (out_dir / "report.md").read_text()
  for text in ("unreadable image: missing", "empty titles", "conflicting titles", "class_sizes.png"):
    assert text in report
  for name in ("class_sizes.png", "decisions.png", "report.html", "examples_dropped.png"):
    assert (out_dir / name).stat().st_size > 0
  lonely = decisions["lonely"]  # A one-item label: merged into a neighbour or dropped, with the reason.
  assert lonely["step"] in ("long_tail", "merge", "outliers") and lonely["reason"], lonely


def test_curated_catalogue_feeds_the_records(governed):
  workdir, out, _, config = governed
  out_dir = workdir / "governance"
  decisions = _read(out_dir / "decisions.csv")
  curated = _read(out_dir / "curated_catalogue.csv")
  kept = [d for d in decisions if d["action"] != "dropped"]
  assert [r["id"] for r in curated] == [d["id"] for d in kept]
  assert [r["label"] for r in curated] == [d["category"] for d in kept]
  category_map = _read(out_dir / "category_map.csv")
  assert all(m["reason"] for m in category_map)
  records = pathlib.Path(out["paths"]["records"])
  labels = json.loads((records / "labels.json").read_text())
  assert set(labels["train"]) == {r["label"] for r in curated if r["split"] == "train"}
  weights = pipeline.read_class_weights(records, "train")
  stored = json.loads((out_dir / "class_weights.json").read_text())["weights"]
  assert weights == [stored[label] for label in sorted(labels["train"], key=labels["train"].get)]
  assert max(weights) == 1.0 and min(weights) > 0
  # Raw records of the same workdir must not inherit the governed weights.
  from oclear_jax import run_data  # pylint: disable=g-import-not-at-top
  raw = ml_collections.ConfigDict(config.data.to_dict())
  raw.records_dir = str(workdir / "raw_records")
  prepared = run_data.prepare_data(raw, str(workdir), progress=False)
  assert pipeline.read_class_weights(prepared.records_dir, "train") is None


def test_a_url_workdir_gets_the_same_governance_files(governed, tmp_path):
  """A gs:// workdir (ram:// here): the same files under {workdir}/governance, nothing local under
  the scheme's name, and the curated records written there from them."""
  import os  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir, out, _, config = governed
  before = sorted(os.listdir(os.getcwd()))
  remote = "ram://governed_run"
  remote_out = govern.run(config, remote, progress=False)
  assert sorted(os.listdir(os.getcwd())) == before
  local_names = sorted(p.name for p in (workdir / "governance").iterdir() if p.is_file())
  assert sorted(n.rstrip("/") for n in tf.io.gfile.listdir(f"{remote}/governance")
                if not tf.io.gfile.isdir(f"{remote}/governance/{n}")) == local_names
  for name in ("curated_catalogue.csv", "decisions.csv", "category_map.csv"):
    with tf.io.gfile.GFile(f"{remote}/governance/{name}") as f:
      assert f.read() == (workdir / "governance" / name).read_text(encoding="utf-8"), name
  assert remote_out["paths"]["curated_catalogue.csv"] == f"{remote}/governance/curated_catalogue.csv"
  assert remote_out["paths"]["records"] == f"{remote}/records"
  assert tf.io.gfile.exists(f"{remote}/records/records.json")
  assert out["counts"] == remote_out["counts"]
