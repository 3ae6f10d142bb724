"""Per-item exposure (or click) counts: duplicates and capped heads keep their most seen items.

Planted into a small built-in catalogue: an exposure column with random counts, exact copies of
some documents carrying more exposure than their originals, and unusable exposure values. The
reference is the planted exposure itself: which copy must survive, which items a cap must keep.
"""
import collections
import csv
import shutil

import numpy as np
import pytest

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import synthetic_catalogue
from oclear_jax.governance import curate
from oclear_jax.governance import decisions as decisions_lib
from oclear_jax.governance import executors
from oclear_jax.governance import settings as settings_lib

CAP = 3
BAD_EXPOSURE = {"bad_exposure_text": "many", "bad_exposure_negative": "-4", "bad_exposure_empty": ""}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
  """(rows read with the exposure column, reader counts, {copy id: original id})."""
  root = tmp_path_factory.mktemp("exposure") / "raw"
  synthetic_catalogue.generate_catalogue(root, synthetic_catalogue.CatalogueSpec(num_products=30, image_size=32),
                                         progress=False)
  with open(root / "catalogue.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  rng = np.random.default_rng(0)
  for r in rows:
    r["exposure"] = str(int(rng.integers(1, 1000)))
  docs = [r for r in rows if r["kind"] == "doc" and r["split"] == "train" and r["title"]]
  copies = {}
  for k, original in enumerate(docs[:6]):  # Exact copies: the first three seen more, the others less.
    copy_id = f"copy_{k}"
    suffix = original["image"].rsplit(".", 1)[1]
    shutil.copyfile(root / original["image"], root / "images" / f"{copy_id}.{suffix}")
    exposure = int(original["exposure"]) + 5000 if k < 3 else 0
    rows.append({**original, "id": copy_id, "image": f"images/{copy_id}.{suffix}", "exposure": str(exposure)})
    copies[copy_id] = original["id"]
  for k, (row_id, value) in enumerate(BAD_EXPOSURE.items()):
    rows.append({**docs[10 + k], "id": row_id, "exposure": value})
  with open(root / "catalogue.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
  columns = catalogue_lib.CatalogueColumns(kind="kind", split="split", exposure="exposure")
  read = catalogue_lib.read_catalogue(root / "catalogue.csv", columns)
  return read.rows, read.counts, copies


@pytest.fixture(scope="module")
def curated(catalogue):
  rows, _, _ = catalogue
  settings = settings_lib.defaults(image_features="pixels", executor="in_process", max_category_size=CAP)
  return curate.curate_categories(rows, settings, executors.InProcessExecutor(progress=False))


def test_unusable_exposure_values_are_counted_and_read_as_zero(catalogue):
  rows, counts, _ = catalogue
  assert counts["invalid_exposure"] == len(BAD_EXPOSURE)
  by_id = {r.id: r for r in rows}
  assert all(by_id[i].exposure == 0.0 for i in BAD_EXPOSURE)
  assert all(r.exposure is not None for r in rows)
  plain = catalogue_lib.read_catalogue(rows[0].image_path.rsplit("/images/", 1)[0] + "/catalogue.csv",
                                       catalogue_lib.CatalogueColumns(kind="kind", split="split"))
  assert all(r.exposure is None for r in plain.rows)  # Without the column: no exposure at all.


def test_a_duplicate_group_keeps_its_most_exposed_item(catalogue, curated):
  rows, _, copies = catalogue
  exposure = {r.id: r.exposure for r in rows}
  decisions = {d.id: d for d in curated.decisions}
  checked = 0
  for copy_id, original_id in copies.items():
    pair = [decisions[copy_id], decisions[original_id]]
    dropped = [d for d in pair if d.step == "duplicates"]
    if not dropped:  # The pair ended in different categories (or a cap took one first).
      continue
    (loser,) = dropped
    winner = pair[1] if loser is pair[0] else pair[0]
    assert exposure[winner.id] > exposure[loser.id], (winner, loser)
    assert loser.reason.endswith(f"duplicate of {winner.id}"), loser
    checked += 1
  assert checked >= 4, checked


def test_capped_categories_keep_their_most_exposed_items(catalogue, curated):
  rows, _, _ = catalogue
  exposure = {r.id: r.exposure for r in rows}
  kept, capped = collections.defaultdict(list), collections.defaultdict(list)
  for d in curated.decisions:
    if d.split != "train" or d.kind != "doc":
      continue
    if d.step == "head_cap":
      capped[d.reasons[-1].split()[1]].append(exposure[d.id])
    elif d.action != decisions_lib.DROPPED:
      kept[d.category].append(exposure[d.id])
  assert capped, "no category reached the cap"
  for category, dropped in capped.items():
    assert len(kept[category]) == CAP
    assert min(kept[category]) >= max(dropped), (category, kept[category], dropped)
  assert curated.counts["exposure"]["kept"] < curated.counts["exposure"]["total"]
