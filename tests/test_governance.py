"""Governance against planted ground truth: wrong labels, split products, multi-product labels.

The built-in catalogue records every noise it plants (ground_truth.csv); governance never reads
that file, and the scores here compare its decisions with it. 'pixels' features keep this fast;
benchmarks/governance_quality.py measures the EfficientNet-Lite0 features on the same catalogue.
"""
import collections

import pytest

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import synthetic_catalogue
from oclear_jax import config_schema
from oclear_jax.governance import curate
from oclear_jax.governance import decisions as decisions_lib
from oclear_jax.governance import executors
from oclear_jax.governance import planted_noise
from oclear_jax.governance import quality
from oclear_jax.governance import settings as settings_lib

PIXELS = settings_lib.defaults(image_features="pixels", executor="in_process")


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
  """The built-in catalogue at the default noise settings of config_schema (300 products)."""
  root = tmp_path_factory.mktemp("governance") / "catalogue"
  spec = synthetic_catalogue.CatalogueSpec(**config_schema.base_config().data.synthetic.to_dict())
  synthetic_catalogue.generate_catalogue(root, spec, progress=False)
  columns = catalogue_lib.CatalogueColumns(kind="kind", split="split")
  rows = catalogue_lib.read_catalogue(root / "catalogue.csv", columns).rows
  return rows, quality.read_truth(str(root / "ground_truth.csv"))


@pytest.fixture(scope="module")
def curated(builtin):
  rows, _ = builtin
  return curate.curate_categories(rows, PIXELS, executors.InProcessExecutor(progress=False))


def test_wrong_labels_and_products_are_recovered(builtin, curated):
  _, truth = builtin
  scores = quality.score_curation(curated.decisions, truth)
  wrong, products, raw = scores["wrong_labels"], scores["products"], scores["raw_products"]
  assert wrong["planted"] >= 40  # The default 5% of ~1,000 train documents.
  assert wrong["precision"] >= 0.9 and wrong["recall"] >= 0.9, wrong  # Measured 1.0 and 1.0.
  assert products["f1"] >= 0.9 and products["precision"] >= 0.9 and products["recall"] >= 0.9, products
  assert products["f1"] >= raw["f1"] + 0.05, (products, raw)  # Raw labels score ~0.89.


def test_split_products_are_merged(builtin, curated):
  _, truth = builtin
  split_labels = {d.raw_label for d in curated.decisions if "split_id" in truth[d.id]["noise"]}
  home = {d.id: d.category for d in curated.decisions}
  reunited = 0
  for label in split_labels:
    products = {truth[d.id]["product"] for d in curated.decisions if d.raw_label == label and d.kind == "doc"}
    members = [d for d in curated.decisions if d.kind == "doc" and truth[d.id]["product"] in products
               and d.action != decisions_lib.DROPPED and "wrong_label" not in truth[d.id]["noise"]]
    reunited += len({home[d.id] for d in members}) == 1
  assert len(split_labels) >= 8
  assert reunited >= 0.8 * len(split_labels), (reunited, len(split_labels))


def test_every_row_has_one_decision_with_a_reason(builtin, curated):
  rows, _ = builtin
  assert [d.id for d in curated.decisions] == [r.id for r in rows]
  for d in curated.decisions:
    assert d.action in decisions_lib.ACTIONS
    if d.action == decisions_lib.DROPPED:
      assert d.step and d.reasons and not d.category, d
    if d.action == decisions_lib.RELABELLED:
      assert d.category != d.raw_label and d.reasons, d
    if d.split == "eval":  # Evaluation stays comparable: untouched.
      assert d.action == decisions_lib.KEPT and d.category == d.raw_label and d.step == "passthrough"
  kept = collections.Counter(d.category for d in curated.decisions if d.action != decisions_lib.DROPPED
                             and d.split == "train")
  assert kept == collections.Counter(curated.sizes_after)
  assert set(curated.weights) == set(curated.sizes_after)
  smallest, largest = min(kept, key=kept.get), max(kept, key=kept.get)
  assert curated.weights[largest] == pytest.approx((kept[smallest] / kept[largest]) ** 0.5 *
                                                   curated.weights[smallest])


def test_labels_covering_two_products_are_split(builtin):
  rows, truth = builtin
  noisy, planted = planted_noise.plant_label_noise(rows, wrong_fraction=0.0, split_fraction=0.0, merge_fraction=0.1,
                                                   seed=1)
  for row_id, t in planted.items():  # Keep the catalogue's own noise and its true products.
    t["noise"] = ";".join(n for n in (truth[row_id]["noise"], t["noise"]) if n)
    t["product"] = truth[row_id]["product"]
  result = curate.curate_categories(noisy, PIXELS, executors.InProcessExecutor(progress=False))
  multi = {r.label for r in noisy if "merged_label" in planted[r.id]["noise"]}
  labels = {r.label for r in noisy if r.split == "train"}
  split = {s["label"] for s in result.splits}
  # Measured: 22 of 25 planted labels split; 2 other labels split off a pair of wrong labels, which
  # the outlier step then relabels one by one.
  assert len(split & multi) >= 0.7 * len(multi) and len(split - multi) <= 0.02 * len(labels), (split, multi)
  scores = quality.score_curation(result.decisions, planted)
  assert scores["raw_products"]["precision"] < 0.8, scores  # Measured 0.75: merged labels hurt precision.
  assert scores["products"]["precision"] >= 0.95 and scores["products"]["f1"] >= 0.95, scores  # Measured 1.0.
