"""The long tail and the head: tiny categories merged or dropped, big ones capped, sampling weights.

  * A category with fewer than `min_category_size` training items (governed and following kinds)
    is merged into its nearest category (among the nearest centroids) when their centroids are consistent with one product
    (D <= merge_max_distance, no mutual-best requirement: the small one just joins), else dropped.
  * A category with more than `max_category_size` governed items (0 = no cap) keeps a fixed
    subset (ordered by a hash of the item id, so reruns keep the same items).
  * Class-balanced sampling weights: w_c = n_c ** -balance_power, scaled so the largest is 1
    (0.5 = inverse square root of size; 1 = fully balanced; 0 = uniform). The input pipeline uses
    them as acceptance probabilities (input_pipeline/pipeline.py, rejection sampling), so a
    category's share of batches grows as n_c ** (1 - balance_power).
"""
from __future__ import annotations

import hashlib

import numpy as np

from oclear_jax.governance import category_stats
from oclear_jax.governance import centroid_search
from oclear_jax.governance import settings as settings_lib


def small_categories(stats: category_stats.CategoryStats, sizes: np.ndarray,
                     settings: settings_lib.GovernanceSettings) -> dict[int, tuple[int, float]]:
  """{small category: (target category or -1 to drop, D to the nearest big category)}.

  The nearest is the smallest D among the `merge_neighbours` big centroids nearest by plain
  distance (centroid_search.py).
  """
  small = np.flatnonzero((sizes > 0) & (sizes < settings.min_category_size))
  big = (sizes >= settings.min_category_size) & (stats.size() > 0)
  out = {}
  if not len(small):
    return out
  means = stats.joint_means()
  nearest = centroid_search.CentroidSearch(means, big, settings.merge_neighbours, queries=len(small)).nearest(
      means[small])
  for c, candidates in zip(small, nearest):
    candidates = candidates[candidates >= 0]
    if not len(candidates) or stats.size()[c] == 0:
      out[int(c)] = (-1, float("nan"))
      continue
    pairs = np.stack([np.full(len(candidates), c), np.sort(candidates)], 1)
    distance = np.nan_to_num(category_stats.category_distances(stats, pairs)["combined"], nan=np.inf)
    nearest_row = int(np.argmin(distance))
    target = int(pairs[nearest_row, 1]) if distance[nearest_row] <= settings.merge_max_distance else -1
    out[int(c)] = (target, float(distance[nearest_row]))
  return out


def cap_key(item_id: str, exposure: float = 0.0) -> tuple[float, str]:
  """Where an item stands in a capped category: the most exposed first (when the catalogue has
  exposure counts), ties by sha256 of the id (independent of catalogue order)."""
  return -float(exposure), hashlib.sha256(item_id.encode("utf-8")).hexdigest()


def cap_order(item_ids: list[str], exposure: np.ndarray | None = None) -> np.ndarray:
  """The order in which a capped category keeps items (`cap_key`; equal keys in input order)."""
  exposure = np.zeros(len(item_ids)) if exposure is None else np.asarray(exposure, np.float64)
  keys = [cap_key(i, e) for i, e in zip(item_ids, exposure)]
  return np.array(sorted(range(len(keys)), key=keys.__getitem__), np.int64)


def emit_by_category(chunk, cap: int):  # pylint: disable=unused-argument
  """(category names, cap_keys, positions) of a chunk of kept items -> (name, (cap_key, position))."""
  names, keys, positions = chunk
  for name, key, position in zip(names, keys, positions):
    yield name, (key, int(position))


def beyond_cap(name: str, members, cap: int) -> list[int] | None:  # pylint: disable=unused-argument
  """The positions a category drops: all after its first `cap` members in cap order."""
  return [position for _, position in sorted(members)[cap:]] or None


def sampling_weights(sizes: dict[str, int], power: float) -> dict[str, float]:
  """{category: n ** -power / max}: acceptance probabilities for the input pipeline."""
  raw = {c: float(n) ** -power for c, n in sizes.items() if n > 0}
  top = max(raw.values(), default=1.0)
  return {c: w / top for c, w in sorted(raw.items())}
