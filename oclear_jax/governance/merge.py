"""Merge labels that denote one product: a kNN graph over category centroids, connected components.

Candidates are each category's `merge_neighbours` nearest centroids (centroid_search.py: ScaNN,
exact below a thousand centroids, in whitened units). An edge joins a and b when
  * D(a, b) <= merge_max_distance on images and titles together (two samples of one product give
    D ~ 1; see category_stats.py),
  * their titles agree on their own (the same test on the title block alone, when both have titles),
  * they are each other's best candidate (mutual nearest by D),
  * most members of each fit the other: a majority of a's trusted members lie within
    `merge_max_distance` of b's centroid (the typical member sits at ~1), and the other way round.
Mutual-best keeps connected components from chaining through broad or tiny categories that are
"consistent" with many others. It does not stop every chain: on the Myntra sample, labels of two
to five items still join unrelated small labels (e.g. 'Bangle' with 'Highlighter and Blush'),
because a real catalogue's broad categories set a wide spread and tiny labels carry little
evidence. The majority fit stops a small label whose centroid a wrong member has pulled half-way
towards another label from merging with it. Merging repeats on the merged
centroids until no edge is left, so a product split three ways still ends up whole; the later rounds
test the first round's candidate pairs between the groups they now belong to (one search per merge).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from oclear_jax.governance import category_stats
from oclear_jax.governance import centroid_search
from oclear_jax.governance import settings as settings_lib

_MAX_ROUNDS = 50


@dataclasses.dataclass(frozen=True)
class MergeEdge:
  """One accepted merge: groups (by their member categories) and the evidence."""
  left: tuple[int, ...]
  right: tuple[int, ...]
  distance: float
  title_distance: float  # NaN when one side has no titles


def nearest_centroids(stats: category_stats.CategoryStats, k: int) -> np.ndarray:
  """i64[P, 2] candidate pairs (a < b): each non-empty category and its k nearest others (centroid_search)."""
  means = stats.joint_means()
  alive = stats.size() > 0
  ids = np.flatnonzero(alive)
  if len(ids) < 2:
    return np.zeros((0, 2), np.int64)
  k = min(k, len(ids) - 1)
  nearest = centroid_search.CentroidSearch(means, alive, k + 1).nearest(means[ids])
  # Each row's own centroid leaves the list (it is first unless an equal centroid ties with it).
  nearest = np.where(nearest == ids[:, None], -1, nearest)
  keep = np.cumsum(nearest >= 0, axis=1) <= k
  left = np.broadcast_to(ids[:, None], nearest.shape)
  chosen = (nearest >= 0) & keep
  return _unique_pairs(np.sort(np.stack([left[chosen], nearest[chosen]], 1), 1))[0]


def _unique_pairs(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(the distinct rows of i64[P, 2] in lexicographic order, each row's index among them), by one int64 key
  per row (np.unique(axis=0) sorts void views, which is slow)."""
  if not len(pairs):
    return pairs.reshape(0, 2).astype(np.int64), np.zeros(0, np.int64)
  width = int(pairs.max()) + 1
  keys, inverse = np.unique(pairs[:, 0].astype(np.int64) * width + pairs[:, 1], return_inverse=True)
  return np.stack([keys // width, keys % width], 1), inverse.reshape(-1)


def _members_of(group: np.ndarray, num_groups: int) -> list[np.ndarray]:
  """Indices i with group[i] == g, for each g (one sort, not one scan per group)."""
  order = np.argsort(group, kind="stable")
  bounds = np.searchsorted(group[order], np.arange(num_groups + 1))
  return [order[bounds[g]:bounds[g + 1]] for g in range(num_groups)]


def _fits_majority(members, rows_of: list[np.ndarray], pooled: category_stats.CategoryStats, a: int, b: int,
                   limit: float) -> bool:
  """Whether most of a's members are within `limit` of b's centroid, and the other way round."""
  space, positions, _ = members
  for source, target in ((a, b), (b, a)):
    rows = rows_of[source]
    if not len(rows):
      continue
    distance = category_stats.distances_to(space.take(positions[rows]), pooled, target)
    if not np.nanmean(np.nan_to_num(distance, nan=np.inf) <= limit) > 0.5:
      return False
  return True


def merge_categories(stats: category_stats.CategoryStats, settings: settings_lib.GovernanceSettings,
                     title_block: int | None = 1, members=None) -> tuple[np.ndarray, list[MergeEdge]]:
  """Returns (group i64[C] for each category, the accepted edges).

  `members`: (the Space, the rows of its trusted items, their category ids) for the majority-fit test;
  None skips it.
  """
  num = stats.num_categories
  group = np.arange(num)
  edges: list[MergeEdge] = []
  pairs = source = measured = None
  for _ in range(_MAX_ROUNDS):
    num_groups = group.max() + 1 if num else 0
    pooled = category_stats.pool(stats, group, num_groups)
    pairs = nearest_centroids(pooled, settings.merge_neighbours) if pairs is None else pairs
    if not len(pairs):
      break
    measured = _distances(pooled, pairs, title_block, source, measured)
    combined, title = measured[0], (measured[1] if len(measured) > 1 else None)
    # Mutual best partner by D (ties go to the lower category id: deterministic).
    order = np.lexsort((pairs[:, 1], pairs[:, 0], combined))
    best = np.full(num_groups, -1)
    ends = np.stack([pairs[order, 0], pairs[order, 1]], 1).ravel()
    partners = np.stack([pairs[order, 1], pairs[order, 0]], 1).ravel()
    nodes, first = np.unique(ends, return_index=True)  # each node's earliest pair in `order`
    best[nodes] = partners[first]
    accept = (combined <= settings.merge_max_distance) & (best[pairs[:, 0]] == pairs[:, 1]) & (
        best[pairs[:, 1]] == pairs[:, 0])
    if title is not None:
      accept &= ~(title > settings.merge_max_distance)  # NaN (a side without titles) passes on images alone.
    if members is not None and accept.any():
      rows_of = _members_of(group[members[2]], num_groups)
      for row in np.flatnonzero(accept):
        accept[row] = _fits_majority(members, rows_of, pooled, *pairs[row], settings.merge_max_distance)
    chosen = pairs[accept]
    if not len(chosen):
      break
    group_members = [tuple(m.tolist()) for m in _members_of(group, num_groups)]
    for row in np.flatnonzero(accept):
      a, b = pairs[row]
      edges.append(MergeEdge(group_members[a], group_members[b], float(combined[row]),
                             float(title[row]) if title is not None else float("nan")))
    graph = coo_matrix((np.ones(len(chosen)), (chosen[:, 0], chosen[:, 1])), shape=(num_groups, num_groups))
    _, component = connected_components(graph, directed=False)
    previous, group = group, _renumber(component[group])
    pairs, source = _carried(pairs, previous, group)
  return group, edges


def _distances(pooled, pairs, title_block, source, last) -> list[np.ndarray]:
  """[combined D, title-block D (when there is one)] per pair. A pair carried between two groups that did
  not merge (`source` row >= 0) keeps last round's values: its statistics, and so its distances, are the same."""
  fresh = np.arange(len(pairs)) if source is None else np.flatnonzero(source < 0)
  dist = category_stats.category_distances(pooled, pairs[fresh])
  values = [np.nan_to_num(dist["combined"], nan=np.inf)]
  if title_block is not None and title_block < len(dist["blocks"]):
    values.append(dist["blocks"][title_block])
  if source is None:
    return values
  kept = np.flatnonzero(source >= 0)
  out = []
  for value, previous in zip(values, last):
    full = np.empty(len(pairs))
    full[fresh], full[kept] = value, previous[source[kept]]
    out.append(full)
  return out


def _carried(pairs: np.ndarray, previous: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Last round's candidate pairs between the groups they now belong to (no new search: a merged group's
  candidates are its parts'; a pair inside one group leaves), and for each the row of last round's pair
  it is when neither group merged (-1 otherwise)."""
  renamed = np.empty(previous.max() + 1, np.int64)
  renamed[previous] = group
  parts = np.bincount(renamed)  # last round's groups in each group
  moved = np.sort(renamed[pairs], 1)
  rows = np.flatnonzero(moved[:, 0] != moved[:, 1])  # a pair inside one group leaves
  unique, inverse = _unique_pairs(moved[rows])
  source = np.full(len(unique), -1, np.int64)
  source[inverse] = rows
  source[(parts[unique[:, 0]] > 1) | (parts[unique[:, 1]] > 1)] = -1
  return unique, source


def _renumber(group: np.ndarray) -> np.ndarray:
  """Group ids 0..G-1 in order of each group's smallest member (stable, deterministic)."""
  _, first = np.unique(group, return_index=True)
  order = np.argsort(first)
  remap = np.empty(len(order), np.int64)
  remap[order] = np.arange(len(order))
  _, dense = np.unique(group, return_inverse=True)
  return remap[dense]
