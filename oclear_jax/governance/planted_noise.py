"""Plant known label noise into a clean catalogue, to measure governance where the truth is known.

The built-in synthetic catalogue plants its own noise; a real catalogue (e.g. the Myntra sample,
whose labels we take as clean) gets it here, on the train split only, recorded per row:
  * split_id: `split_fraction` of the classes (of those with >= 2 train rows) have a random half of
    their rows renamed '<label>~b' (one product under two ids: governance should merge them);
  * wrong_label: `wrong_fraction` of the other train rows take the label of another random train
    row of a different class (so noise follows class frequencies and every class keeps most of its
    true members; where that class was split, either half);
  * merged_label: `merge_fraction` of the classes are renamed to another class's label (two
    products under one id: governance should split them).
Written in the project's catalogue format with an explicit split column (so that renamed labels
stay in their split) and absolute image paths, plus ground_truth.csv (id, product, true_label,
noise) in the format of input_pipeline.synthetic_catalogue.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from input_pipeline.catalogue import CatalogueRow


def plant_label_noise(rows: Sequence[CatalogueRow], *, wrong_fraction: float = 0.2, split_fraction: float = 0.1,
                      merge_fraction: float = 0.0, seed: int = 0
                      ) -> tuple[list[CatalogueRow], dict[str, dict[str, str]]]:
  """(noisy rows, ground truth {id: {id, product, true_label, noise}})."""
  rng = np.random.default_rng(seed)
  labels = [r.label for r in rows]
  noise = [set() for _ in rows]
  train = [i for i, r in enumerate(rows) if r.split == "train"]
  by_class = collections.defaultdict(list)
  for i in train:
    by_class[rows[i].label].append(i)
  classes = sorted(by_class)
  merged: dict[str, str] = {}
  if merge_fraction > 0 and len(classes) >= 2:
    order = [classes[k] for k in rng.permutation(len(classes))]
    count = min(len(order) // 2, int(round(merge_fraction * len(classes))))
    for k in range(count):
      absorbed, host = order[2 * k], order[2 * k + 1]
      merged[absorbed] = host
      for i in by_class[absorbed]:
        labels[i] = host
        noise[i].add("merged_label")
  splittable = [c for c in classes if len(by_class[c]) >= 2 and c not in merged and c not in merged.values()]
  count = min(len(splittable), int(round(split_fraction * len(classes))))
  split_classes = sorted(splittable[k] for k in rng.choice(len(splittable), size=count, replace=False))
  for c in split_classes:
    members = by_class[c]
    for k in rng.choice(len(members), size=len(members) // 2, replace=False):
      labels[members[k]] = f"{c}~b"
      noise[members[k]].add("split_id")
  split_set = set(split_classes)
  candidates = [i for i in train if not noise[i]]
  count = min(len(candidates), int(round(wrong_fraction * len(train)))) if len(by_class) >= 2 else 0
  for k in sorted(rng.choice(len(candidates), size=count, replace=False)):
    i = candidates[k]
    other = i
    while rows[other].label == rows[i].label:
      other = train[rng.integers(len(train))]
    target = merged.get(rows[other].label, rows[other].label)
    if rows[other].label in split_set:
      target = rows[other].label + ("~b" if rng.random() < 0.5 else "")
    labels[i] = target
    noise[i].add("wrong_label")
  noisy = [dataclasses.replace(r, label=label) for r, label in zip(rows, labels)]
  truth = {r.id: {"id": r.id, "product": r.label, "true_label": r.label, "noise": ";".join(sorted(n))}
           for r, n in zip(rows, noise)}
  return noisy, truth


def write_catalogue(root: str, rows: Sequence[CatalogueRow], truth: dict[str, dict[str, str]]) -> str:
  """root/catalogue.csv (id,image,title,label,kind,split) and root/ground_truth.csv; returns the CSV path."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "catalogue.csv")
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(("id", "image", "title", "label", "kind", "split"))
    for r in rows:
      writer.writerow((r.id, r.image_path, r.title, r.label, r.kind, r.split))
  with open(os.path.join(root, "ground_truth.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(("id", "product", "true_label", "noise"))
    for r in rows:
      t = truth[r.id]
      writer.writerow((t["id"], t["product"], t["true_label"], t["noise"]))
  return path
