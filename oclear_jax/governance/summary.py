"""Counts and the category map of a finished curation (what the report and the map file show)."""
from __future__ import annotations

import collections
from typing import Any

import numpy as np



_CONFLICT_COSINE = 0.1  # TF-IDF cosine below which a title shares next to nothing with its label's others


def _conflicting_titles(s, frows) -> tuple[int, int, list[str]]:
  """Raw labels with a member whose title shares next to nothing with the label's other titles.

  Per governed item with a title: cosine of its TF-IDF vector to the sum of the other titled members
  of its raw label below _CONFLICT_COSINE. Returns (labels, items, up to 20 example labels).
  """
  if not s.titles.vocabulary_size:
    return 0, 0, []
  rows_of = collections.defaultdict(list)
  for local in np.flatnonzero(s.core & s.titles.present):
    rows_of[frows[local].label].append(local)
  labels, items = [], 0
  for label, rows in sorted(rows_of.items()):
    if len(rows) < 2:
      continue
    matrix = s.titles.vectors[rows]
    total = np.asarray(matrix.sum(axis=0)).ravel()
    dots = matrix @ total - np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel()
    others = np.sqrt(np.maximum((total ** 2).sum() - 2 * (matrix @ total) + np.asarray(
        matrix.multiply(matrix).sum(axis=1)).ravel(), 1e-12))
    conflicting = int((dots / others < _CONFLICT_COSINE).sum())
    if conflicting:
      labels.append(label)
      items += conflicting
  return len(labels), items, labels[:20]


def _merge_records(s, names) -> list[dict[str, Any]]:
  out = []
  for edge in s.edges:
    left = sorted(s.node_names[n] for n in edge.left)
    right = sorted(s.node_names[n] for n in edge.right)
    out.append({"left": left, "right": right, "category": names[s.group[edge.left[0]]],
                "distance": edge.distance, "title_distance": edge.title_distance})
  return out


def _category_map(s, frows, category, names) -> list[dict[str, Any]]:
  by_label = collections.defaultdict(list)
  for local, r in enumerate(frows):
    by_label[r.label].append(local)
  split_of = {r["label"]: r for r in s.split_records}
  partners = collections.defaultdict(list)
  for edge in s.edges:
    for side, other in ((edge.left, edge.right), (edge.right, edge.left)):
      for n in side:
        partners[s.node_names[n]].append((sorted(s.node_names[m] for m in other), edge.distance))
  label_index = {label: k for k, label in enumerate(s.labels)}
  nodes_of = collections.defaultdict(list)
  for n, lab in enumerate(s.node_label):
    nodes_of[s.labels[lab]].append(n)
  out = []
  for label in sorted(by_label):
    locs = by_label[label]
    kept = [l for l in locs if category[l]]
    homes = collections.Counter(category[l] for l in kept)
    nodes = nodes_of.get(label, [])
    targets = []
    for n in nodes:
      name = names[s.group[n]]
      name = s.long_tail.get(name, (name, 0.0))[0] if name in s.long_tail else name
      if name and name not in targets:
        targets.append(name)
    reasons = []
    if label not in label_index:
      reasons.append("no governed item with a readable image; items kept as is" if kept else
                     "no readable image")
    if label in split_of:
      rec = split_of[label]
      effects = ", ".join(f"{cut['effect']:.1f}" for cut in rec["cuts"])
      reasons.append(f"split into {len(rec['parts'])} products {rec['parts']} (sizes {rec['sizes']}, "
                     f"effect {effects})")
    for n in nodes:
      for other, distance in partners.get(s.node_names[n], []):
        reasons.append(f"merged with {', '.join(other)} (D {distance:.2f})")
      name = names[s.group[n]]
      if name in s.long_tail:
        target, distance = s.long_tail[name]
        reasons.append(f"long tail: merged into {target} (D {distance:.2f})" if target else
                       f"long tail: dropped (nearest D {distance:.2f})")
    if not reasons:
      reasons.append("kept" if targets == [label] else f"now {';'.join(targets) or 'dropped'}")
    out.append({"raw_label": label, "category": ";".join(targets) if targets else (homes.most_common(1)[0][0]
                                                                                   if homes else ""),
                "items": len(locs), "kept": len(kept),
                "relabelled_away": sum(1 for l in kept if category[l] not in targets and nodes),
                "dropped": len(locs) - len(kept), "reason": "; ".join(reasons)})
  return out


def _exposure_kept(frows, category) -> dict[str, float]:
  """{'total', 'kept'} exposure of the governed items when the catalogue has the column, else {}."""
  if all(r.exposure is None for r in frows):
    return {}
  exposure = [r.exposure or 0.0 for r in frows]
  return {"total": float(sum(exposure)), "kept": float(sum(e for e, c in zip(exposure, category) if c))}


def summarize(s, frows, category, names, weights, duplicates, *, result_type):
  decisions = s.decisions
  in_scope = [decisions[i] for i in s.featured]
  labels_conflicting, items_conflicting, conflict_examples = _conflicting_titles(s, frows)
  core_labels = collections.Counter(frows[l].label for l in np.flatnonzero(s.core))
  steps = collections.Counter(f"{d.step or 'unchanged'}/{d.action}" for d in decisions)
  counts = {
      "rows": len(decisions),
      "rows_governed": int(s.core.sum() + sum(1 for l in range(len(frows)) if not s.core[l] and
                                               frows[l].kind in s.settings.kinds)),
      "rows_following": sum(1 for r in frows if r.kind not in s.settings.kinds),
      "rows_passthrough": len(decisions) - len(frows),
      "unreadable_images": dict(collections.Counter(e.split(":")[0] for e, ok in zip(s.image.errors, s.image.ok)
                                                    if not ok)),
      "empty_titles": sum(1 for r in frows if not r.title.strip() and r.kind in s.settings.kinds),
      "singleton_labels": sum(1 for v in core_labels.values() if v == 1),
      "conflicting_title_labels": labels_conflicting,
      "conflicting_title_items": items_conflicting,
      "conflicting_title_examples": conflict_examples,
      "labels_before": len({r.label for r in frows}),
      "categories_after": len({c for c in category if c}),
      "actions": dict(collections.Counter(d.action for d in in_scope)),
      "steps": dict(sorted(steps.items())),
      "split_labels": len(s.split_records),
      "merge_edges": len(s.edges),
      "long_tail_merged": sum(1 for t, _ in s.long_tail.values() if t),
      "long_tail_dropped": sum(1 for t, _ in s.long_tail.values() if not t),
      "duplicates": ({"exact_pairs": sum(1 for p in duplicates.pairs if p[2] == "exact"),
                      "near_pairs": sum(1 for p in duplicates.pairs if p[2] == "near"),
                      "dropped": steps.get("duplicates/dropped", 0),
                      "groups_spanning_categories": s.dup_spanning,
                      "skipped_buckets": duplicates.skipped_buckets,
                      "split_buckets": duplicates.split_buckets} if duplicates else {}),
      "title_vocabulary": s.titles.vocabulary_size,
      "exposure": _exposure_kept(frows, category),
  }
  sizes_before = dict(collections.Counter(r.label for r in frows))
  sizes_after = dict(collections.Counter(c for c in category if c))
  core = np.flatnonzero(s.core)
  features = {"ids": [frows[i].id for i in core], "rows": core, "blocks": list(s.reduced)}  # no [N, d] copy
  return result_type(decisions=decisions, category_map=_category_map(s, frows, category, names), weights=weights,
                     counts=counts, sizes_before=sizes_before, sizes_after=sizes_after,
                     merges=_merge_records(s, names), splits=s.split_records, notes=s.notes, features=features)
