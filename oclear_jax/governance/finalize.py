"""After the rounds: outlier decisions, following kinds, long tail, duplicates, head cap, weights, map.

Works on category names from here on: a curated category is named after its biggest raw label
(or label part), so most categories keep the id a user knows; a merged one takes the name of its
biggest member label, and the category map lists the others.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from oclear_jax.governance import category_space
from oclear_jax.governance import category_stats
from oclear_jax.governance import decisions as decisions_lib
from oclear_jax.governance import duplicates as duplicates_lib
from oclear_jax.governance import executors
from oclear_jax.governance import featurize
from oclear_jax.governance import long_tail
from oclear_jax.governance import merge as merge_lib
from oclear_jax.governance import outliers as outliers_lib
from oclear_jax.governance import settings as settings_lib
from oclear_jax.governance import step_clock
from oclear_jax.governance import summary

KEPT, RELABELLED, DROPPED = decisions_lib.KEPT, decisions_lib.RELABELLED, decisions_lib.DROPPED


@dataclasses.dataclass
class CurationState:
  """What the rounds leave behind; arrays indexed by position among the featured (in-scope) rows."""
  rows: list
  featured: np.ndarray
  decisions: list[decisions_lib.ItemDecision]
  settings: settings_lib.GovernanceSettings
  image: featurize.ImageFeatures
  titles: featurize.TitleFeatures
  unit: category_space.UnitImages
  space: category_space.Space | None
  core: np.ndarray
  node_of: np.ndarray
  node_names: list[str]
  node_label: list[int]
  labels: list[str]
  group: np.ndarray
  trusted: np.ndarray
  flagged: np.ndarray
  scores: dict[str, np.ndarray]
  edges: list[merge_lib.MergeEdge]
  split_records: list[dict[str, Any]]
  notes: list[str]
  reduced: list[np.ndarray] = dataclasses.field(default_factory=list)  # PCA/SVD blocks before whitening
  outliers_on: bool = True  # the outlier step ran (it is skipped when the space is not calibrated)
  long_tail: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)  # name -> (target, D)
  dup_spanning: int = 0  # duplicate groups whose members ended in different categories


@dataclasses.dataclass
class CurationResult:
  decisions: list[decisions_lib.ItemDecision]  # one per input row, in order
  category_map: list[dict[str, Any]]
  weights: dict[str, float]
  counts: dict[str, Any]
  sizes_before: dict[str, int]  # raw label -> rows of the governed splits
  sizes_after: dict[str, int]  # curated category -> kept rows of the governed splits
  merges: list[dict[str, Any]]
  splits: list[dict[str, Any]]
  notes: list[str]
  # The governed items' features, for comparisons such as benchmarks/governance_quality.py's Confident
  # Learning reference on the same features: their ids, their rows of the reduced blocks, those blocks.
  features: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # wall seconds per step (step_clock.py)


def _group_names(s: CurationState) -> list[str]:
  """Each group's name: its node with the most trusted members (ties: the smaller name)."""
  trusted_count = np.bincount(s.node_of[s.trusted], minlength=len(s.node_names))
  names = {}
  for node in sorted(range(len(s.node_names)), key=lambda k: (-trusted_count[k], s.node_names[k])):
    names.setdefault(int(s.group[node]), s.node_names[node])
  return [names[g] for g in range(int(s.group.max()) + 1)] if len(s.group) else []


def _node_image_means(s: CurationState) -> np.ndarray:
  """f64[nodes, d]: each node's trusted members' mean on images (NaN rows for nodes without one)."""
  x = s.space.blocks[0]
  rows = np.flatnonzero(s.trusted)
  sums = category_space.group_sums(x, rows, s.node_of[rows], len(s.node_names))
  counts = np.bincount(s.node_of[s.trusted], minlength=len(s.node_names))
  with np.errstate(invalid="ignore", divide="ignore"):
    return sums / np.where(counts > 0, counts, np.nan)[:, None]


def _nearest_part(s: CurationState, means: np.ndarray, local: int, nodes: list[int]) -> int:
  """The split part nearest to item `local` on images alone (shopper photos have no titles)."""
  distance = ((means[nodes] - s.space.blocks[0][local]) ** 2).sum(1)
  return nodes[int(np.argmin(np.nan_to_num(distance, nan=np.inf)))] if np.isfinite(distance).any() else nodes[0]


def finalize(s: CurationState, clock: step_clock.StepClock, executor) -> CurationResult:
  with clock.step("decisions"):
    category, names = _decide(s)
  frows = [s.rows[i] for i in s.featured]
  with clock.step("long tail"):
    _long_tail(s, frows, category, names)
  with clock.step("duplicates"):
    duplicates = _deduplicate(s, frows, category, executor) if s.settings.dedupe else None
  with clock.step("head cap"):
    _cap_heads(s, frows, category, executor)
  with clock.step("summary"):
    sizes_after = collections.Counter(c for c in category if c)
    weights = long_tail.sampling_weights(dict(sizes_after), s.settings.balance_power)
    result = summary.summarize(s, frows, category, names, weights, duplicates, result_type=CurationResult)
  result.seconds = dict(clock.seconds)
  return result


def _decide(s: CurationState) -> tuple[list[str], list[str]]:
  """Curated name per featured item ('' = dropped) after outliers, label moves and following kinds."""
  settings, rows, decisions = s.settings, s.rows, s.decisions
  frows = [rows[i] for i in s.featured]
  names = _group_names(s)
  category = [""] * len(frows)  # Curated name per featured item; '' = dropped.
  core_rows = np.flatnonzero(s.core)
  for local in core_rows:
    category[local] = names[s.group[s.node_of[local]]]

  # Outliers: relabel to the nearest category, or drop.
  if s.outliers_on and len(core_rows):
    actions, targets, distances = outliers_lib.decide(s.flagged[core_rows], s.scores, settings)
    for k, local in enumerate(core_rows):
      d = decisions[s.featured[local]]
      d.own_distance, d.nearest_distance = float(s.scores["own"][k]), float(distances[k])
      here = category[local]
      d.outlier = actions[k] != outliers_lib.KEEP
      if actions[k] == outliers_lib.RELABEL:
        target = names[targets[k]]
        category[local] = target
        d.set(RELABELLED, "outliers", f"far from {here} (distance {d.own_distance:.2f}); fits {target} "
              f"({d.nearest_distance:.2f})", target)
      elif actions[k] == outliers_lib.DROP:
        category[local] = ""
        d.set(DROPPED, "outliers", f"far from {here} (distance {d.own_distance:.2f}) and no category fits "
              f"(nearest {d.nearest_distance:.2f} > {settings.outlier_max_distance})")

  # Label-level moves (split, merge) for items the outlier step left where they were.
  for local in core_rows:
    d = decisions[s.featured[local]]
    if d.step or not category[local] or category[local] == d.raw_label:
      continue
    node = s.node_of[local]
    if s.node_names[node] != d.raw_label and category[local] == s.node_names[node]:
      d.set(RELABELLED, "split", f"label {d.raw_label} split into separate products; this item is in part "
            f"{category[local]}", category[local])
    else:
      d.set(RELABELLED, "merge", f"label {s.node_names[node]} merged into {category[local]}", category[local])

  # Following kinds (shopper photos): the category of their label, nearest part when split.
  nodes_of_label = collections.defaultdict(list)
  for node, label in enumerate(s.node_label):
    nodes_of_label[s.labels[label]].append(node)
  means = _node_image_means(s) if any(len(v) > 1 for v in nodes_of_label.values()) else None
  for local, r in enumerate(frows):
    d = decisions[s.featured[local]]
    if s.core[local] or d.action == DROPPED:
      continue
    nodes = nodes_of_label.get(r.label)
    if not nodes:
      category[local] = r.label
      d.set(KEPT, "follow", f"no governed item has label {r.label}; kept as is", r.label)
      continue
    node = nodes[0] if len(nodes) == 1 else _nearest_part(s, means, local, nodes)
    category[local] = names[s.group[node]]
    if category[local] != r.label:
      d.set(RELABELLED, "follow", f"follows label {r.label} to {category[local]}", category[local])
  return category, names


def _long_tail(s: CurationState, frows, category: list[str], names: list[str]) -> None:
  settings, decisions = s.settings, s.decisions
  if not settings.long_tail:
    return
  kept_names = sorted({c for c in category if c})
  index = {c: k for k, c in enumerate(kept_names)}
  sizes = np.bincount([index[c] for c in category if c], minlength=len(kept_names))
  in_stats = np.array([bool(c) for c in category], bool) & s.core
  ids = np.array([index.get(c, 0) for c in category], np.int64)
  stats = category_stats.accumulate(s.space, ids, in_stats, len(kept_names)) if s.space else None
  if stats is None:
    return
  moves = long_tail.small_categories(stats, sizes, settings)
  for c, (target, distance) in moves.items():
    s.long_tail[kept_names[c]] = (kept_names[target] if target >= 0 else "", distance)
  for local, name in enumerate(category):
    if name in s.long_tail:
      target, distance = s.long_tail[name]
      d = decisions[s.featured[local]]
      if target:
        category[local] = target
        d.set(RELABELLED, "long_tail", f"category {name} has {sizes[index[name]]} item(s) < "
              f"{settings.min_category_size}; merged into {target} (D {distance:.2f})", target)
      else:
        category[local] = ""
        d.set(DROPPED, "long_tail", f"category {name} has {sizes[index[name]]} item(s) < "
              f"{settings.min_category_size} and no category is close (nearest D {distance:.2f})")


def _exposure(frows, rows: np.ndarray) -> np.ndarray:
  """f64[len(rows)]: the catalogue's exposure or click counts (0 without the column)."""
  return np.array([frows[i].exposure or 0.0 for i in rows], np.float64)


def _deduplicate(s: CurationState, frows, category: list[str], executor) -> duplicates_lib.DuplicateGroups:
  """Keeps one item of each duplicate group within one curated category: the most exposed, then the first."""
  governed = np.flatnonzero(s.core)
  # Over every featured item (the ungoverned ones do not take part), so that no [governed, D] copy is made.
  found = duplicates_lib.find_duplicates(
      s.image.sha256, s.image.phash, s.core, s.unit, [r.title if c else "" for r, c in zip(frows, s.core)],
      s.settings, executor)
  first = {}
  for k in np.lexsort((np.arange(len(governed)), -_exposure(frows, governed))):
    local = governed[k]
    g = found.group[local]
    if g < 0 or not category[local]:
      continue
    key = (g, category[local])
    if key not in first:
      first[key] = local
      continue
    original = frows[first[key]].id
    s.decisions[s.featured[local]].set(DROPPED, "duplicates", f"{found.kind[local]} duplicate of {original}")
    category[local] = ""
  categories_of = collections.defaultdict(set)
  for local in np.flatnonzero(found.group >= 0):
    if category[local]:
      categories_of[found.group[local]].add(category[local])
  s.dup_spanning = sum(1 for names in categories_of.values() if len(names) > 1)
  return found


def _cap_heads(s: CurationState, frows, category: list[str], executor) -> None:
  """Drops each category's items beyond `max_category_size` in cap order: a pass keyed by category."""
  cap = s.settings.max_category_size
  if not cap:
    return
  governed = np.array([local for local in np.flatnonzero(s.core) if category[local]], np.int64)
  parts = executors.row_chunks(governed, s.settings.chunk_size)
  chunks = (([category[local] for local in part],
             [long_tail.cap_key(frows[local].id, e) for local, e in zip(part, _exposure(frows, part))], part)
            for part in parts)
  found = executor.group_by_key("head cap", long_tail.emit_by_category, long_tail.beyond_cap, chunks,
                                sizes=[len(p) for p in parts], shared=cap)
  for local in sorted(local for dropped in found for local in dropped):
    name = category[local]
    s.decisions[s.featured[local]].set(DROPPED, "head_cap", f"category {name} keeps {cap} items "
                                       f"(config.governance.max_category_size)")
    category[local] = ""
