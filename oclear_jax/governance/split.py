"""Split labels whose members form separate clusters (one id covering several products).

A label is bisected with Ward clustering (scikit-learn) on its trusted members in whitened units;
the cut stands when
  * both parts have at least `split_min_part` members (a lone wrong label is an outlier, not a
    product),
  * the parts differ by a real effect, not just by sampling, on images and on titles alike: the
    effect size (squared centroid distance per dimension, minus what two samples of one product
    would show) of each block is at least `split_min_effect` within-category variances, and D is
    above `merge_max_distance` (so that the merge step would not join them again).
Parts are bisected again, up to `split_max_parts`. On the built-in catalogue, bisecting a single
product gives effects below ~0.15 and a label over two products above ~0.25 on both blocks. A
broad category of a real catalogue ("Watches": analogue and digital) has real sub-modes too (up to
~1 on Myntra articleTypes): where categories are meant to be broad, raise `split_min_effect` or
switch the step off; the effect-size rule is what keeps them whole.
Labels larger than `split_max_items` are clustered on an evenly spaced sample; every member,
trusted or not, then goes to its nearest part.

The step is a keyed pass (executors.group_by_key): each chunk of items emits its members under their
label (`emit_members`), and each label is split where its members land (`split_members`).
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import AgglomerativeClustering

from oclear_jax.governance import category_space
from oclear_jax.governance import category_stats
from oclear_jax.governance import settings as settings_lib


def emit_members(chunk, settings: settings_lib.GovernanceSettings):  # pylint: disable=unused-argument
  """(rows i64[n], labels i64[n], their space rows, trusted bool[n]) -> (label, member) pairs; a member is
  (row, trusted, its row of each block, whether it has each block)."""
  rows, labels, space, trusted = chunk
  for k in range(len(rows)):
    yield int(labels[k]), (int(rows[k]), bool(trusted[k]), [b[k] for b in space.blocks],
                           [bool(a[k]) for a in space.avail])


def split_members(label: int, members, settings: settings_lib.GovernanceSettings):
  """(label, rows i64[n] ascending, part ids i64[n], cuts) when the label's members split; else None."""
  members = sorted(members, key=lambda m: m[0])
  trusted = np.array([m[1] for m in members], bool)
  if trusted.sum() < 2 * settings.split_min_part:
    return None
  blocks = [np.stack([m[2][b] for m in members]) for b in range(len(members[0][2]))]
  avail = [np.array([m[3][b] for m in members], bool) for b in range(len(members[0][3]))]
  parts, cuts = split_category(category_space.Space(blocks, avail), trusted, settings)
  return (label, np.array([m[0] for m in members], np.int64), parts, cuts) if cuts else None


def _joint(space: category_space.Space) -> np.ndarray:
  """Blocks side by side; a missing block (no title) takes the members' mean, a neutral value."""
  columns = []
  for x, a in zip(space.blocks, space.avail):
    filled = x.copy()
    if a.any() and not a.all():
      filled[~a] = x[a].mean(0)
    columns.append(filled)
  return np.concatenate(columns, axis=1)


def _part_test(space: category_space.Space, parts: np.ndarray) -> tuple[float, float]:
  """(effect size, D) between parts 0 and 1 of `space`; the effect is the smallest over the blocks
  both parts have (images and titles must both tell the parts apart)."""
  stats = category_stats.accumulate(space, parts, np.ones(len(parts), bool), 2)
  dist = category_stats.category_distances(stats, np.array([[0, 1]]))
  effects = [float(e[0]) for e in dist["block_effects"] if np.isfinite(e[0])]
  return (min(effects) if effects else float("nan")), float(dist["combined"][0])


def split_category(space: category_space.Space, trusted: np.ndarray, settings: settings_lib.GovernanceSettings
                   ) -> tuple[np.ndarray, list[dict[str, float]]]:
  """Part ids i64[n] for the n members in `space` (all 0 when the label stays whole) and the cuts made."""
  n = space.num_items
  rows = np.flatnonzero(trusted)
  if len(rows) > settings.split_max_items:
    rows = rows[np.linspace(0, len(rows) - 1, settings.split_max_items).round().astype(np.int64)]
  if len(rows) < 2 * settings.split_min_part:
    return np.zeros(n, np.int64), []
  joint = _joint(space)
  pending, final, cuts = [rows], [], []
  while pending:
    group = pending.pop(0)
    if len(group) < 2 * settings.split_min_part or len(final) + len(pending) + 1 >= settings.split_max_parts:
      final.append(group)
      continue
    halves = AgglomerativeClustering(n_clusters=2, linkage="ward").fit_predict(joint[group])
    if min(np.bincount(halves, minlength=2)) < settings.split_min_part:
      final.append(group)
      continue
    effect, distance = _part_test(space.take(group), halves)
    if not effect >= settings.split_min_effect or distance <= settings.merge_max_distance:
      final.append(group)
      continue
    cuts.append({"effect": effect, "distance": distance, "sizes": [int((halves == 0).sum()), int((halves == 1).sum())]})
    pending += [group[halves == 0], group[halves == 1]]
  if len(final) == 1:
    return np.zeros(n, np.int64), []
  # Every member to the nearest part centroid; parts numbered by size, largest first.
  final.sort(key=lambda g: (-len(g), int(g.min())))
  centroids = np.stack([joint[g].mean(0) for g in final])
  sq = (joint ** 2).sum(1)[:, None] - 2 * joint @ centroids.T + (centroids ** 2).sum(1)[None]
  return sq.argmin(1).astype(np.int64), cuts
