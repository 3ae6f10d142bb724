"""Scores of a curation against planted ground truth (tests and benchmarks/governance_quality.py).

Ground truth is a CSV with columns id, product, noise (the synthetic catalogue's ground_truth.csv,
or one a benchmark writes after planting noise into a real catalogue). Scored over the governed
items that ground truth covers:
  * wrong labels: the items governance flagged as outliers (relabelled or dropped by the outlier
    step) against the items planted with noise 'wrong_label': precision and recall;
  * duplicates: a dropped duplicate is right when it or its kept original is a planted near
    duplicate of the same product; recall counts planted near duplicates in some dropped pair;
  * recovered products: pairwise precision, recall and F1 of the curated categories against the
    true products, over all scored items. An item dropped as a duplicate stands for its kept
    original (it is represented by it); any other dropped item is a singleton, so dropping costs
    recall. The same scores of the raw labels are the baseline.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Sequence

from oclear_jax.governance import decisions as decisions_lib

_DUPLICATE_OF = re.compile(r"duplicate of (\S+)$")


def pairwise_scores(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
  """Pairwise precision/recall/F1 of a clustering (`predicted` ids) against `truth` ids."""
  pairs = lambda counter: sum(v * (v - 1) // 2 for v in counter.values())
  together = pairs(collections.Counter(zip(predicted, truth)))
  predicted_pairs, true_pairs = pairs(collections.Counter(predicted)), pairs(collections.Counter(truth))
  precision = together / predicted_pairs if predicted_pairs else 1.0
  recall = together / true_pairs if true_pairs else 1.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1}


def detection_scores(flagged: set[str], planted: set[str]) -> dict[str, float]:
  hits = len(flagged & planted)
  return {"precision": hits / len(flagged) if flagged else 1.0, "recall": hits / len(planted) if planted else 1.0,
          "flagged": len(flagged), "planted": len(planted)}


def score_curation(decisions: Sequence[decisions_lib.ItemDecision], truth: dict[str, dict[str, str]], *,
                   kinds: Sequence[str] = ("doc",), splits: Sequence[str] = ("train",)) -> dict[str, dict]:
  """{'wrong_labels', 'products', 'raw_products', 'duplicates'} scores over the governed items in `truth`."""
  scored = [d for d in decisions if d.id in truth and d.kind in kinds and d.split in splits]
  by_id = {d.id: d for d in scored}

  def home(d: decisions_lib.ItemDecision, depth: int = 0) -> str:
    if d.action != decisions_lib.DROPPED:
      return d.category
    match = _DUPLICATE_OF.search(d.reasons[-1]) if d.step == "duplicates" else None
    if match and match.group(1) in by_id and depth < 10:
      return home(by_id[match.group(1)], depth + 1)
    return f"__dropped__{d.id}"

  flagged = {d.id for d in scored if d.outlier}
  planted = {d.id for d in scored if "wrong_label" in truth[d.id].get("noise", "")}
  dup_planted = {d.id for d in scored if "near_duplicate" in truth[d.id].get("noise", "")}
  originals = {d.id: _DUPLICATE_OF.search(d.reasons[-1]).group(1) for d in scored if d.step == "duplicates"}
  dup_correct = sum(1 for i, o in originals.items() if (i in dup_planted or o in dup_planted)
                    and o in truth and truth[i]["product"] == truth[o]["product"])
  dup_found = {i for pair in originals.items() for i in pair} & dup_planted
  products = [truth[d.id]["product"] for d in scored]
  return {
      "wrong_labels": detection_scores(flagged, planted),
      "products": pairwise_scores([home(d) for d in scored], products),
      "raw_products": pairwise_scores([d.raw_label for d in scored], products),
      "duplicates": {"precision": dup_correct / len(originals) if originals else 1.0,
                     "recall": len(dup_found) / len(dup_planted) if dup_planted else 1.0,
                     "dropped": len(originals), "planted": len(dup_planted)},
      "items": {"scored": len(scored)},
  }


def read_truth(path: str) -> dict[str, dict[str, str]]:
  return {r["id"]: r for r in decisions_lib.read_csv(path)}
