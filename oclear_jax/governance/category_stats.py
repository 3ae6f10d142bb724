"""Per-category sums and the two distances every step uses, in whitened units (category_space.py).

  item distance   z(i, c) = |x_i - mean_c|^2 / d / (1 + 1/n_c), averaged over the blocks (image,
                  title) both sides have. ~1 for a typical member of c (the 1 + 1/n_c corrects for
                  the centroid's own noise), so `outlier_max_distance=4` means "four times the usual
                  squared spread". An item's distance to its own category leaves the item out.
  category distance D(a, b) = |mean_a - mean_b|^2 / d / (1/n_a + 1/n_b): ~1 when a and b are two
                  samples of one product, growing with the evidence (n) that they differ.
Sums and counts are additive, so the statistics of merged categories are sums of rows (`pool`),
and a distributed pass can combine them per key.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from oclear_jax.governance import category_space

_PAIR_CHUNK = 16384


@dataclasses.dataclass
class CategoryStats:
  sums: list[np.ndarray]  # per block f64[C, d_b]
  counts: list[np.ndarray]  # per block f64[C]

  @property
  def num_categories(self) -> int:
    return len(self.counts[0])

  def size(self) -> np.ndarray:
    """Members per category (the image block: every governed item has an image)."""
    return self.counts[0]

  def joint_means(self) -> np.ndarray:
    """f64[C, sum of d_b]: every block's means side by side (zeros where a category lacks a block)."""
    return np.concatenate([self.means(b) for b in range(len(self.sums))], axis=1)

  def means(self, b: int, rows=None) -> np.ndarray:
    """Block b's means of every category, or of `rows` only (an index or index array: no [C, d] work)."""
    if rows is None:
      return self.sums[b] / np.maximum(self.counts[b], 1)[:, None]
    return self.sums[b][rows] / np.maximum(self.counts[b][rows], 1)[..., None]


def accumulate(space: category_space.Space, categories: np.ndarray, mask: np.ndarray,
               num_categories: int) -> CategoryStats:
  sums, counts = [], []
  for x, a in zip(space.blocks, space.avail):
    rows = np.flatnonzero(mask & a)
    sums.append(category_space.group_sums(x, rows, categories[rows], num_categories))
    counts.append(np.bincount(categories[rows], minlength=num_categories).astype(np.float64))
  return CategoryStats(sums, counts)


def pool(stats: CategoryStats, assignment: np.ndarray, num_groups: int) -> CategoryStats:
  """Statistics of groups of categories (`assignment[c]` = group of category c)."""
  sums = [category_space.group_sums(s, np.arange(len(s)), assignment, num_groups) for s in stats.sums]
  counts = [np.bincount(assignment, weights=c, minlength=num_groups) for c in stats.counts]
  return CategoryStats(sums, counts)


def item_scores(space: category_space.Space, own: np.ndarray, in_trusted: np.ndarray, in_members: np.ndarray,
                trusted: CategoryStats, members: CategoryStats, candidates: np.ndarray) -> dict[str, np.ndarray]:
  """Distances of items to their own category (leave-one-out) and to the nearest other candidate.

  The own centroid comes from the category's other trusted members; when it has none, from its
  other members of any standing; with no other member at all the own distance is NaN (a
  singleton, which no distance can call an outlier of itself). The other categories are the
  `candidates` (centroid_search.CategoryIndex: the nearest trusted centroids), scored exactly.

  Args:
    space: the items (a chunk of them).
    own: i32[n] their categories.
    in_trusted, in_members: bool[n] whether each item is counted in `trusted` / `members`.
    trusted, members: statistics of the trusted items and of all items, per category.
    candidates: i64[n, K] candidate categories per item, ascending, -1 padded.

  Returns:
    own f64[n], best f64[n] (inf when no other category is a candidate), best_category i64[n].
  """
  n = len(own)
  rows = np.arange(n)
  slots = np.maximum(candidates, 0)
  num_other, den_other = np.zeros(candidates.shape), np.zeros(candidates.shape)
  num_own, den_own = np.zeros(n), np.zeros(n)
  for b, (x, a) in enumerate(zip(space.blocks, space.avail)):
    d = x.shape[1]
    counts = trusted.counts[b]
    sq = np.stack([((x - trusted.means(b, slots[:, j])) ** 2).sum(1) for j in range(slots.shape[1])], axis=1) \
        if slots.shape[1] else np.zeros(candidates.shape)
    candidate_counts = counts[slots]
    valid = a[:, None] & (candidates >= 0) & (candidate_counts > 0)
    num_other += np.where(valid, sq / (1 + 1 / np.maximum(candidate_counts, 1)), 0)
    den_other += valid * d
    # Own category, leave-one-out; fall back to all members when no other trusted member is left.
    self_t = (in_trusted & a).astype(np.float64)
    n_t = counts[own] - self_t
    self_m = (in_members & a).astype(np.float64)
    n_m = members.counts[b][own] - self_m
    use_members = n_t <= 0
    sums_own = np.where(use_members[:, None], members.sums[b][own] - x * self_m[:, None],
                        trusted.sums[b][own] - x * self_t[:, None])
    n_own = np.where(use_members, n_m, n_t)
    mean_own = sums_own / np.maximum(n_own, 1)[:, None]
    sq_own = ((x - mean_own) ** 2).sum(1) / (1 + 1 / np.maximum(n_own, 1))
    has = a & (n_own > 0)
    num_own += np.where(has, sq_own, 0)
    den_own += has * d
  other = np.where(den_other > 0, num_other / np.maximum(den_other, 1), np.inf)
  other[(candidates == own[:, None]) | (candidates < 0)] = np.inf
  pick = other.argmin(1) if other.shape[1] else np.zeros(n, np.int64)
  best = other[rows, pick] if other.shape[1] else np.full(n, np.inf)
  best_category = np.where(np.isfinite(best), slots[rows, pick], 0) if other.shape[1] else np.zeros(n, np.int64)
  own_distance = np.where(den_own > 0, num_own / np.maximum(den_own, 1), np.nan)
  return {"own": own_distance, "best": best, "best_category": best_category.astype(np.int64)}


def distances_to(space: category_space.Space, stats: CategoryStats, category: int) -> np.ndarray:
  """z(i, category) for every item of `space` (none of them counted in `stats`); NaN without overlap."""
  num, den = np.zeros(space.num_items), np.zeros(space.num_items)
  for b, (x, a) in enumerate(zip(space.blocks, space.avail)):
    n = stats.counts[b][category]
    if n <= 0:
      continue
    sq = ((x - stats.means(b, category)) ** 2).sum(1) / (1 + 1 / n)
    num += np.where(a, sq, 0)
    den += a * x.shape[1]
  return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def category_distances(stats: CategoryStats, pairs: np.ndarray) -> dict[str, np.ndarray]:
  """D(a, b) for rows (a, b) of `pairs`: combined over blocks, per block, and the effect size.

  'effect' is |mean_a - mean_b|^2 / d minus its expectation under one product, (1/n_a + 1/n_b):
  how far apart two categories are, whatever their sizes (used to decide splits); 'block_effects'
  the same per block (NaN where a side lacks the block). Pairs are taken `_PAIR_CHUNK` at a time, so
  the [pairs, d] temporaries stay small.
  """
  parts = [_category_distances(stats, pairs[i:i + _PAIR_CHUNK]) for i in range(0, max(len(pairs), 1), _PAIR_CHUNK)]
  join = lambda key: np.concatenate([p[key] for p in parts])
  join_blocks = lambda key: [np.concatenate([p[key][b] for p in parts]) for b in range(len(stats.sums))]
  return {"combined": join("combined"), "blocks": join_blocks("blocks"), "effect": join("effect"),
          "block_effects": join_blocks("block_effects")}


def _category_distances(stats: CategoryStats, pairs: np.ndarray) -> dict[str, np.ndarray]:
  a, b = pairs[:, 0], pairs[:, 1]
  total_num, total_den, total_eff = np.zeros(len(pairs)), np.zeros(len(pairs)), np.zeros(len(pairs))
  per_block, block_effects = [], []
  for i in range(len(stats.sums)):
    counts = stats.counts[i]
    d = stats.sums[i].shape[1]
    ok = (counts[a] > 0) & (counts[b] > 0)
    inverse_n = 1 / np.maximum(counts[a], 1) + 1 / np.maximum(counts[b], 1)
    sq = ((stats.means(i, a) - stats.means(i, b)) ** 2).sum(1) / d
    block = np.where(ok, sq / inverse_n, np.nan)
    per_block.append(block)
    block_effects.append(np.where(ok, sq - inverse_n, np.nan))
    total_num += np.where(ok, sq / inverse_n * d, 0)
    total_eff += np.where(ok, (sq - inverse_n) * d, 0)
    total_den += ok * d
  combined = np.where(total_den > 0, total_num / np.maximum(total_den, 1), np.inf)
  effect = np.where(total_den > 0, total_eff / np.maximum(total_den, 1), np.nan)
  return {"combined": combined, "blocks": per_block, "effect": effect, "block_effects": block_effects}
