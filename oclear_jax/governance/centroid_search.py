"""Candidate categories by nearest centroid, through ScaNN: what keeps governance linear in the catalogue.

Scoring an item against every category, or every category against every other, costs items x
categories, and categories grow with the catalogue. Every step that needs "the nearest other
categories" (item scores, merge candidates, the long tail's nearest big category) instead asks this
index for a few candidates by squared distance between whitened vectors and decides on those with
its exact statistic (category_stats.py), so a category outside the candidates can only be missed when
it is farther than all of them by plain distance.

Below `_MIN_FOR_TREE` centroids, or for few queries (the long tail's small categories), the search is
ScaNN's exact brute force; above it a k-means tree of about sqrt(C) leaves, searching the nearest
`_LEAVES_SEARCHED` of them, with anisotropic hashing and exact re-scoring of the best `_REORDER`
(squared L2 throughout): a query costs ~17 sqrt(C) distances. In whitened units an item's own
product sits far nearer than the others, the regime where a tree finds it;
benchmarks/governance_scale.py measures what the approximation costs against the exact path.
"""
from __future__ import annotations

import math
import uuid

import numpy as np

_BUILT: dict[str, object] = {}  # token -> ScaNN searcher, so that a pickled search is rebuilt once per process
_KEEP_BUILT = 4
_MIN_FOR_TREE = 1000
_EXACT_WORK = 2 * 10 ** 8  # queries x centroids below which exact search beats training a tree
_LEAVES_SEARCHED = 16  # a fixed number, so a query scans ~16 sqrt(C) centroids, not a fraction of C
_REORDER = 64


def _build_searcher(gallery: np.ndarray, k: int, queries: int | None):
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top  (a few seconds)
  builder = scann_ops_pybind.builder(gallery, k, "squared_l2")
  if len(gallery) < _MIN_FOR_TREE or (queries is not None and queries * len(gallery) <= _EXACT_WORK):
    return builder.score_brute_force().build()
  leaves = int(round(math.sqrt(len(gallery))))
  return builder.tree(num_leaves=leaves, num_leaves_to_search=min(leaves, _LEAVES_SEARCHED),
                      training_sample_size=min(len(gallery), 100_000)).score_ah(2).reorder(
                          max(_REORDER, 2 * k)).build()


class CentroidSearch:
  """The k nearest of a set of centroids (rows of `means` where `alive`), by squared distance.

  `queries`: how many queries it will answer, when known and few (exact search, no tree to train).
  """

  def __init__(self, means: np.ndarray, alive: np.ndarray, k: int, queries: int | None = None):
    self.ids = np.flatnonzero(alive)
    self.k = int(k)
    self.queries = queries
    self._gallery = np.ascontiguousarray(means[self.ids], np.float32) if len(self.ids) else None
    self._token = uuid.uuid4().hex
    self._build()

  def _build(self) -> None:
    self._index = None
    if self._gallery is not None:
      if self._token not in _BUILT:
        while len(_BUILT) >= _KEEP_BUILT:  # an earlier round's searches are not needed again
          del _BUILT[next(iter(_BUILT))]
        _BUILT[self._token] = _build_searcher(self._gallery, min(self.k, len(self.ids)), self.queries)
      self._index = _BUILT[self._token]

  def __getstate__(self):
    """Pickled (a per-item pass on Beam) without the ScaNN searcher, which is rebuilt where it lands."""
    return {k: v for k, v in self.__dict__.items() if k != "_index"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._build()

  def nearest(self, x: np.ndarray, k: int | None = None) -> np.ndarray:
    """i64[n, k]: ids (rows of `means`) of the nearest centroids to each row of x, nearest first; -1 pads."""
    k = self.k if k is None else int(k)
    out = np.full((len(x), k), -1, np.int64)
    if self._index is None or not len(x):
      return out
    idx, _ = self._index.search_batched(np.ascontiguousarray(x, np.float32), final_num_neighbors=min(k, len(self.ids)))
    idx = np.asarray(idx, np.int64)
    out[:, :idx.shape[1]] = np.where(idx >= 0, self.ids[np.maximum(idx, 0)], -1)
    return out


class CategoryIndex:
  """Candidate categories for items: nearest centroids on images and titles together for an item with a
  title, on images alone for one without (a category without titled members sits at its image mean)."""

  def __init__(self, stats, k: int):
    alive = stats.counts[0] > 0
    self.image = CentroidSearch(stats.means(0), alive, k)
    self.joint = None
    if len(stats.sums) > 1:
      self.joint = CentroidSearch(stats.joint_means(), alive, k)

  def candidates(self, space) -> np.ndarray:
    """i64[n, k]: each item's candidate categories, ascending per row, -1 padded at the end."""
    titled = space.avail[1] if self.joint is not None and len(space.blocks) > 1 else np.zeros(space.num_items, bool)
    found = np.full((space.num_items, self.image.k), -1, np.int64)
    if (~titled).any():
      found[~titled] = self.image.nearest(space.blocks[0][~titled])
    if titled.any():
      found[titled] = self.joint.nearest(np.concatenate([b[titled] for b in space.blocks], axis=1))
    big = np.iinfo(np.int64).max
    found = np.sort(np.where(found < 0, big, found), axis=1)
    return np.where(found == big, -1, found)
