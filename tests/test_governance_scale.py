"""The pieces that keep governance linear in the catalogue, each against a dense reference."""
import collections
import hashlib

import numpy as np
import pytest

from oclear_jax.governance import category_space
from oclear_jax.governance import category_stats
from oclear_jax.governance import centroid_search
from oclear_jax.governance import duplicates
from oclear_jax.governance import executors
from oclear_jax.governance import long_tail
from oclear_jax.governance import outliers
from oclear_jax.governance import settings as settings_lib


def _planted(num_categories, per_category, dim, seed=0):
  """Items scattered (unit variance) around well-separated category means."""
  rng = np.random.default_rng(seed)
  means = rng.standard_normal((num_categories, dim)) * 3.0
  labels = np.repeat(np.arange(num_categories), per_category)
  return means, labels, means[labels] + rng.standard_normal((len(labels), dim))


@pytest.mark.parametrize("num_categories", [300, 1500])  # ScaNN brute force, then its tree
def test_centroid_search_finds_the_nearest_centroid(num_categories):
  means, labels, x = _planted(num_categories, 2, 32)
  nearest = centroid_search.CentroidSearch(means, np.ones(num_categories, bool), 5).nearest(x)
  exact = (((x[:, None] - means[None]) ** 2).sum(-1)).argmin(1)
  assert (nearest[:, 0] == exact).mean() >= (1.0 if num_categories < 1000 else 0.97)  # exact, then approximate
  # Dead centroids are never returned; ids are rows of `means`.
  alive = np.arange(num_categories) % 3 != 0
  found = centroid_search.CentroidSearch(means, alive, 5).nearest(x)
  assert alive[found[found >= 0]].all() and (found >= 0).all()


def _dense_reference(space, own, trusted_stats):
  """best/best_category by scoring every other category (the formula of category_stats, item by item)."""
  best, best_category = [], []
  for i in range(space.num_items):
    scores = []
    for c in range(trusted_stats.num_categories):
      num = den = 0.0
      for b, (x, a) in enumerate(zip(space.blocks, space.avail)):
        n = trusted_stats.counts[b][c]
        if a[i] and n > 0:
          num += ((x[i] - trusted_stats.means(b)[c]) ** 2).sum() / (1 + 1 / n)
          den += x.shape[1]
      scores.append(num / den if den and c != own[i] else np.inf)
    best.append(min(scores))
    best_category.append(int(np.argmin(scores)))
  return np.array(best), np.array(best_category)


def test_item_scores_on_candidates_equal_scoring_every_category():
  means, labels, x = _planted(40, 5, 8, seed=1)
  rng = np.random.default_rng(2)
  titles = means[labels][:, :4] + rng.standard_normal((len(labels), 4))
  has_title = rng.random(len(labels)) > 0.2
  space = category_space.Space([x, np.where(has_title[:, None], titles, 0.0)], [np.ones(len(labels), bool), has_title])
  everyone = np.ones(len(labels), bool)
  stats = category_stats.accumulate(space, labels, everyone, 40)
  reference = _dense_reference(space, labels, stats)
  every = np.broadcast_to(np.arange(40), (len(labels), 40))
  scores = category_stats.item_scores(space, labels, everyone, everyone, stats, stats, every)
  np.testing.assert_allclose(scores["best"], reference[0], rtol=1e-9)
  np.testing.assert_array_equal(scores["best_category"], reference[1])
  candidates = centroid_search.CategoryIndex(stats, 8).candidates(space)
  near = category_stats.item_scores(space, labels, everyone, everyone, stats, stats, candidates)
  np.testing.assert_array_equal(near["best_category"], reference[1])


def test_an_oversized_title_bucket_is_split_not_skipped(monkeypatch):
  """One title on 300 items (a bucket above the limit): planted near copies are still found, nothing skipped."""
  monkeypatch.setattr(duplicates, "_MAX_BUCKET", 50)
  rng = np.random.default_rng(3)
  n = 300
  phash = rng.integers(0, 2 ** 63, size=n, dtype=np.uint64)
  vectors = rng.standard_normal((n, 16))
  planted = [(2 * k, 2 * k + 1) for k in range(5)]
  for a, b in planted[:3]:  # close perceptual hashes (2 bits apart), unlike descriptors
    phash[b] = phash[a] ^ np.uint64(0b101)
  for a, b in planted[3:]:  # close descriptors, unlike hashes
    vectors[b] = vectors[a] + 0.05 * rng.standard_normal(16)
  unit = category_space.UnitImages(vectors.astype(np.float32), np.ones(n, bool), np.zeros(16))
  settings = settings_lib.defaults(dup_min_cosine=0.95, chunk_size=64)
  executor = executors.InProcessExecutor(progress=False)
  found = duplicates.find_duplicates([f"sha{i}" for i in range(n)], phash, np.ones(n, bool), unit,
                                     ["the same catalogue title"] * n, settings, executor)
  assert found.skipped_buckets == 0 and found.split_buckets >= 1
  assert set(planted) == {(i, j) for i, j, _ in found.pairs}
  assert all(kind == "near" for _, _, kind in found.pairs)
  # The same items under unrelated titles pair nothing (a near duplicate needs agreeing titles), and
  # equal content hashes are exact copies of their first item whatever the titles.
  titles = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), 30)) for _ in range(n)]
  sha = [f"sha{i}" for i in range(n)]
  sha[20] = sha[21] = sha[22] = "same bytes"
  alone = duplicates.find_duplicates(sha, phash, np.ones(n, bool), unit, titles, settings, executor)
  assert alone.pairs == [(20, 21, "exact"), (20, 22, "exact")]
  assert alone.group[20] == alone.group[21] == alone.group[22] >= 0 and alone.kind[21] == "exact"


def test_chunked_space_equals_the_dense_formulas(monkeypatch):
  monkeypatch.setattr(category_space, "_CHUNK_ROWS", 7)  # many chunks, one of them partial
  means, labels, x = _planted(12, 5, 6, seed=3)
  rng = np.random.default_rng(4)
  ok, fit = rng.random(len(x)) > 0.1, rng.random(len(x)) > 0.3
  fit &= ok
  x32 = x.astype(np.float32)
  unit = category_space.unit_images(x32, ok, fit)
  centred = x32[ok].astype(np.float64) - x32[fit].astype(np.float64).mean(0)
  np.testing.assert_allclose(unit[ok], centred / np.linalg.norm(centred, axis=1, keepdims=True), atol=1e-12)
  assert not unit[~ok].any()
  reduced = category_space.reduce_images(unit, ok, fit, 3)
  _, vectors = np.linalg.eigh(np.cov(unit[fit].T, bias=True))
  dense = (unit[ok] - unit[fit].mean(0)) @ vectors[:, ::-1][:, :3]
  np.testing.assert_allclose(np.abs(reduced[ok]), np.abs(dense), atol=1e-10)  # axes up to their sign
  np.testing.assert_array_equal(category_space.group_sums(x, np.flatnonzero(fit), labels[fit], 12),
                                np.stack([x[fit & (labels == c)].sum(0) for c in range(12)]))
  space, _ = category_space.whiten([reduced], [ok], labels, fit, shrinkage=0.0)
  rows = ok & fit
  residual = np.concatenate([reduced[rows & (labels == c)] - reduced[rows & (labels == c)].mean(0) for c in range(12)])
  within = residual.T @ residual / (rows.sum() - len(np.unique(labels[rows])))
  whitened = space.blocks[0][rows] - space.blocks[0][rows].mean(0)
  within_after = np.concatenate([whitened[labels[rows] == c] - whitened[labels[rows] == c].mean(0) for c in range(12)])
  # Whitened by the within-category covariance: that covariance becomes the identity.
  np.testing.assert_allclose(within_after.T @ within_after / (rows.sum() - 12), np.eye(3), atol=1e-9)
  assert np.linalg.matrix_rank(within) == 3


def test_merge_rounds_reuse_distances_only_between_groups_that_did_not_merge():
  from oclear_jax.governance import merge  # pylint: disable=g-import-not-at-top
  means, labels, x = _planted(30, 4, 5, seed=5)
  space = category_space.Space([x, x[:, :2]], [np.ones(len(x), bool), np.arange(len(x)) % 5 != 0])
  stats = category_stats.accumulate(space, labels, np.ones(len(x), bool), 30)
  pairs = merge.nearest_centroids(stats, 6)
  first = merge._distances(stats, pairs, 1, None, None)  # pylint: disable=protected-access
  group = np.arange(30)
  group[[3, 17, 21]] = 3  # one round merged three categories and two others
  group[[8, 9]] = 8
  group = merge._renumber(group)  # pylint: disable=protected-access
  carried, source = merge._carried(pairs, np.arange(30), group)  # pylint: disable=protected-access
  pooled = category_stats.pool(stats, group, group.max() + 1)
  reused = merge._distances(pooled, carried, 1, source, first)  # pylint: disable=protected-access
  fresh = merge._distances(pooled, carried, 1, None, None)  # pylint: disable=protected-access
  for a, b in zip(reused, fresh):
    np.testing.assert_array_equal(a, b)
  merged = np.bincount(group) > 1
  assert ((source >= 0) == ~(merged[carried[:, 0]] | merged[carried[:, 1]])).all() and (source >= 0).any()


def test_keyed_outlier_quotas_and_head_cap_equal_one_pass_over_the_global_order():
  """Each category's quota (outliers) and cap (head cap) filled where its members land, against the one
  global pass they replace: walk the items in order and take each while its category has room."""
  rng = np.random.default_rng(0)
  n = 600
  categories = rng.integers(0, 40, n)
  own = rng.uniform(0.0, 4.0, n)
  own[rng.random(n) < 0.05] = np.nan  # singletons have no own distance
  scores = {"own": own, "best": rng.uniform(0.0, 4.0, n)}
  scores["best"][:20] = scores["own"][:20]  # ties in confidence go by position
  settings = settings_lib.defaults(image_features="pixels", chunk_size=64, outlier_max_distance=3.5)
  candidate = np.isfinite(own) & ((scores["best"] < own * (1 - settings.outlier_margin)) |
                                  (own > settings.outlier_max_distance))
  expected, used = np.zeros(n, bool), collections.Counter()
  for i in np.lexsort((np.arange(n), np.where(np.isfinite(own), scores["best"] - own, np.inf))):
    c = categories[i]
    if candidate[i] and used[c] < max(1, (categories == c).sum() // 2):
      expected[i], used[c] = True, used[c] + 1
  assert 0 < expected.sum() < candidate.sum()  # some categories run out of quota
  flagged = outliers.flag(scores, categories, settings, executors.InProcessExecutor(progress=False))
  np.testing.assert_array_equal(flagged, expected)

  ids = [f"item-{i}" for i in range(n)]
  exposure = rng.integers(0, 3, n).astype(float)
  cap, names = 5, [f"c{c}" for c in categories]
  sha = np.array([hashlib.sha256(i.encode("utf-8")).hexdigest() for i in ids])
  np.testing.assert_array_equal(long_tail.cap_order(ids, exposure), np.lexsort((sha, -exposure)))
  kept, beyond = collections.Counter(), []
  for i in long_tail.cap_order(ids, exposure):
    kept[names[i]] += 1
    if kept[names[i]] > cap:
      beyond.append(i)
  chunks = [(names[i:i + 64], [long_tail.cap_key(ids[k], exposure[k]) for k in range(i, min(i + 64, n))],
             np.arange(i, min(i + 64, n))) for i in range(0, n, 64)]
  found = executors.InProcessExecutor(progress=False).group_by_key(
      "head cap", long_tail.emit_by_category, long_tail.beyond_cap, chunks, shared=cap)
  assert sorted(p for dropped in found for p in dropped) == sorted(beyond) and beyond
