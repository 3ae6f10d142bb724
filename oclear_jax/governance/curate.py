"""`curate_categories`: catalogue rows in, one decision per row and a category map out.

Who is governed: rows of `settings.splits` (train by default; eval rows pass through untouched so
that evaluation stays comparable) whose kind is in `settings.kinds` (catalogue documents by
default) define the categories. Rows of the governed splits of other kinds (shopper photos) follow
their label's curated category; where the label was split, the nearest part by image.

Rounds (`settings.rounds`): whiten the space on the trusted items (category_space.py), split labels
once (after the first round, on trusted members), merge labels over the centroids, score every item
against the categories (a per-item pass through the executor) and flag outliers, which become
untrusted for the next round. The first round only sets aside items that clearly misfit their raw
label (no merging yet), so that merges are decided on cleaned centroids. After the rounds
(finalize.py): outlier decisions, long tail, duplicates, head cap, sampling weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from input_pipeline.catalogue import CatalogueRow
from oclear_jax.governance import category_space
from oclear_jax.governance import category_stats
from oclear_jax.governance import centroid_search
from oclear_jax.governance import decisions as decisions_lib
from oclear_jax.governance import executors
from oclear_jax.governance import featurize
from oclear_jax.governance import finalize
from oclear_jax.governance import merge as merge_lib
from oclear_jax.governance import outliers as outliers_lib
from oclear_jax.governance import settings as settings_lib
from oclear_jax.governance import split as split_lib
from oclear_jax.governance import step_clock


_MIN_WITHIN_DOF = 10


def _score_chunk(chunk, shared):
  """The per-item scoring pass: (space rows, own categories, in trusted, in members) -> distances; `shared`
  holds the trusted and all members' category statistics and the centroid index."""
  space, own, in_trusted, in_members = chunk
  trusted, members, index = shared
  return category_stats.item_scores(space, own, in_trusted, in_members, trusted, members, index.candidates(space))


def _score(executor, space, rows, categories, trusted_mask, trusted, members, settings, name):
  parts_of = executors.row_chunks(rows, settings.chunk_size)
  chunks = ((space.take(part), categories[part], trusted_mask[part], np.ones(len(part), bool)) for part in parts_of)
  index = centroid_search.CategoryIndex(trusted, settings.score_candidates)
  parts = executor.map_chunks(name, _score_chunk, chunks, sizes=[len(part) for part in parts_of],
                              shared=(trusted, members, index))
  keys = ("own", "best", "best_category")
  return {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in keys}


def _split_labels(executor, space, core_rows, node_of, trusted, labels, node_names, node_label, split_records,
                  settings):
  """Splits each raw label whose members form separate products (split.py, a pass keyed by label); adds
  the parts as nodes, in label order."""
  parts_of = executors.row_chunks(core_rows, settings.chunk_size)
  chunks = ((part, node_of[part], space.take(part), trusted[part]) for part in parts_of)
  found = executor.group_by_key("split labels", split_lib.emit_members, split_lib.split_members, chunks,
                                sizes=[len(part) for part in parts_of], shared=settings)
  for label, members, parts, cuts in sorted(found, key=lambda f: f[0]):
    first = len(node_names)
    for p in range(1, parts.max() + 1):
      node_names.append(f"{labels[label]}/part{p + 1}")
      node_label.append(label)
    node_of[members[parts > 0]] = first + parts[parts > 0] - 1
    split_records.append({"label": labels[label], "parts": [node_names[label]] + node_names[first:],
                          "sizes": np.bincount(parts).tolist(), "cuts": cuts})


def curate_categories(rows: Sequence[CatalogueRow], settings: settings_lib.GovernanceSettings, executor, *,
                      cache_dir: str | None = None) -> finalize.CurationResult:
  """Runs every enabled step over `rows` (see the module docstring)."""
  clock = step_clock.StepClock()
  decisions = [decisions_lib.ItemDecision(r.id, r.kind, r.split, r.label, category=r.label) for r in rows]
  in_scope = np.array([r.split in settings.splits for r in rows], bool)
  governs = in_scope & np.array([r.kind in settings.kinds for r in rows], bool)
  for i in np.flatnonzero(~in_scope):
    decisions[i].set(decisions_lib.KEPT, "passthrough", f"split {rows[i].split!r} is not governed")
  featured = np.flatnonzero(in_scope)  # Items in the space, by position in `rows`.
  frows = [rows[i] for i in featured]
  with clock.step("featurize"):
    image = featurize.featurize_images([r.image_path for r in frows], settings, executor, cache_dir)
  for local, i in enumerate(featured):
    if not image.ok[local]:
      decisions[i].set(decisions_lib.DROPPED, "featurize", f"image unreadable ({image.errors[local]}): "
                       f"{rows[i].image_path}")
  gov = governs[featured]
  core = gov & image.ok  # Governed items with an image: they define the categories.
  with clock.step("titles"):
    titles = featurize.title_features([r.title for r in frows], core) if settings.title_features else \
        featurize.TitleFeatures(None, np.zeros(len(frows), bool), 0)
  with clock.step("space"):
    unit = category_space.unit_images(image.vectors, image.ok, core)
    reduced = [category_space.reduce_images(unit, image.ok, core, settings.pca_dims)]
    avail = [image.ok.copy()]
    if titles.vocabulary_size:
      reduced.append(category_space.reduce_titles(titles, core, settings.pca_dims))
      avail.append(titles.present & image.ok)

  # Nodes: raw labels of core items, later also the parts of split labels.
  labels = sorted({r.label for r, c in zip(frows, core) if c})
  label_id = {label: k for k, label in enumerate(labels)}
  node_names = list(labels)
  node_label = list(range(len(labels)))
  node_of = np.array([label_id.get(r.label, -1) for r in frows], np.int64)
  core_rows = np.flatnonzero(core)
  trusted = core.copy()
  group = np.arange(len(node_names))
  split_round = min(1, settings.rounds - 1)
  split_records, edges, notes = [], [], []
  scores = {"own": np.full(len(core_rows), np.nan), "best": np.full(len(core_rows), np.inf),
            "best_category": np.zeros(len(core_rows), np.int64)}
  flagged = np.zeros(len(frows), bool)
  space = None
  # Distances are in units of the within-label spread: without enough labels of two or more items
  # that unit is unknown, and merge, split and outlier decisions would be guesses.
  within_dof = len(core_rows) - len(labels)
  calibrated = within_dof >= _MIN_WITHIN_DOF
  if len(core_rows) and not calibrated:
    notes.append(f"only {within_dof} degrees of freedom within labels (< {_MIN_WITHIN_DOF}: too few labels "
                 "with two or more readable items): merge, split and outlier steps were skipped")
  do_split, do_merge, do_outliers = (settings.split and calibrated, settings.merge and calibrated,
                                     settings.outliers and calibrated)
  for r in range(settings.rounds if len(core_rows) else 0):
    categories = np.where(core, group[np.maximum(node_of, 0)], -1)
    with clock.step("space"):
      space = None  # last round's space goes before this round's is made: one [N, d] space at a time
      space, space_notes = category_space.whiten(reduced, avail, categories, trusted, settings.shrinkage)
    if do_split and r == split_round:
      with clock.step("split"):
        _split_labels(executor, space, core_rows, node_of, trusted, labels, node_names, node_label, split_records, settings)
    num_nodes = len(node_names)
    nodes = np.maximum(node_of, 0)
    with clock.step("category statistics"):
      node_stats = category_stats.accumulate(space, nodes, trusted, num_nodes)
    # The first round merges nothing: it only sets aside items that clearly do not fit their label, so
    # that a wrong label cannot pull its label's centroid towards its true product's and merge the two.
    cleaning_round = r == 0 and settings.rounds > 1
    with clock.step("merge"):
      if do_merge and not cleaning_round:
        trusted_rows = core_rows[trusted[core_rows]]
        group, edges = merge_lib.merge_categories(node_stats, settings, title_block=1 if len(reduced) > 1 else None,
                                                  members=(space, trusted_rows, nodes[trusted_rows]))
      else:
        group = np.arange(num_nodes)
    num_groups = int(group.max()) + 1 if num_nodes else 0
    categories = np.where(core, group[np.maximum(node_of, 0)], -1)
    with clock.step("category statistics"):
      trusted_stats = category_stats.pool(node_stats, group, num_groups)
      member_stats = category_stats.accumulate(space, np.maximum(categories, 0), core, num_groups)
    with clock.step("score items"):
      scores = _score(executor, space, core_rows, categories, trusted, trusted_stats, member_stats,
                      settings, f"score items (round {r + 1}/{settings.rounds})")
    if do_outliers:
      with clock.step("outliers"):
        flagged[:] = False
        flagged[core_rows] = outliers_lib.flag(scores, categories[core_rows], settings, executor,
                                               clear_only=cleaning_round)
        trusted = core & ~flagged
  return finalize.finalize(finalize.CurationState(
      rows=rows, featured=featured, decisions=decisions, settings=settings, image=image, titles=titles, unit=unit,
      space=space, core=core, node_of=node_of, node_names=node_names, node_label=node_label, labels=labels,
      group=group, trusted=trusted, flagged=flagged, scores=scores, edges=edges, split_records=split_records,
      notes=notes + (space_notes if space is not None else []), reduced=reduced, outliers_on=do_outliers),
      clock, executor)
