"""Retrieval metrics against hand-computed rankings and a brute-force reference."""
import numpy as np
import pytest

from oclear_jax.evaluators import metrics

# Gallery: index -> label.  Label 0: {0, 1}; label 1: {2, 3, 4}; label 2: {5}.
GALLERY_LABELS = np.array([0, 0, 1, 1, 1, 2])
# Query 2 has label 3, which no gallery item has: it must be excluded.
QUERY_LABELS = np.array([0, 1, 3, 2])
RETRIEVED = np.array([
    [2, 0, 3, 1],  # rel 0 1 0 1
    [3, 4, 0, 2],  # rel 1 1 0 1
    [0, 1, 2, 3],  # no positives anywhere
    [-1, 5, -1, -1],  # rel 0 1 0 0; a naive gallery[-1] would wrongly hit item 5.
])


def test_relevance_matrix_by_hand():
  rel = metrics.relevance_matrix(RETRIEVED, QUERY_LABELS, GALLERY_LABELS)
  np.testing.assert_array_equal(rel, [
      [0, 1, 0, 1],
      [1, 1, 0, 1],
      [0, 0, 0, 0],
      [0, 1, 0, 0],
  ])


def test_num_relevant_by_hand():
  # Several gallery items share each label: R counts all of them.
  r = metrics.num_relevant(QUERY_LABELS, GALLERY_LABELS)
  np.testing.assert_array_equal(r, [2, 3, 0, 1])


def test_retrieval_metrics_by_hand():
  out = metrics.retrieval_metrics(RETRIEVED, QUERY_LABELS, GALLERY_LABELS, ks=(1, 2, 4))
  # Queries 0, 1, 3 count (query 2 has R = 0).
  # Recall@1: hits at rank 1 are q0 no, q1 yes, q3 no -> 1/3.
  # Recall@2: q0 yes (rank 2), q1 yes, q3 yes (rank 2) -> 3/3.
  assert out["recall@1"] == pytest.approx(1 / 3)
  assert out["recall@2"] == pytest.approx(1.0)
  assert out["recall@4"] == pytest.approx(1.0)
  # AP@R:
  #   q0, R=2: ranks 1..2 rel (0, 1); P@2 = 1/2 -> (1/2) * (1/2) = 0.25.
  #   q1, R=3: ranks 1..3 rel (1, 1, 0); P@1 = 1, P@2 = 1 -> (1 + 1)/3 = 2/3.
  #   q3, R=1: rank 1 not relevant -> 0.
  # MAP@R = (0.25 + 2/3 + 0) / 3 = 0.30556.
  assert out["map@r"] == pytest.approx((0.25 + 2 / 3 + 0) / 3)
  # Prec@R: q0 1/2, q1 2/3, q3 0/1 -> (0.5 + 0.6667 + 0) / 3 = 0.38889.
  assert out["prec@r"] == pytest.approx((0.5 + 2 / 3) / 3)
  assert out["num_queries"] == 3
  assert out["num_queries_without_positives"] == 1
  assert out["num_queries_r_truncated"] == 0


def test_ranking_beyond_r_is_ignored_by_map_at_r():
  # R=2; the positives sit at ranks 1 and 3. Only ranks 1..2 count:
  # AP@R = (1/2) * (P@1 * 1 + P@2 * 0) = 0.5, although rank 3 is relevant.
  rel = np.array([[1, 0, 1, 0]], bool)
  assert metrics.map_at_r(rel, np.array([2])) == pytest.approx(0.5)
  assert metrics.r_precision(rel, np.array([2])) == pytest.approx(0.5)


def test_short_lists_count_missing_positions_as_misses():
  # R=3 but only K=2 columns, both relevant: AP@R = (1 + 1)/3, Prec@R = 2/3.
  rel = np.array([[1, 1]], bool)
  assert metrics.map_at_r(rel, np.array([3])) == pytest.approx(2 / 3)
  assert metrics.r_precision(rel, np.array([3])) == pytest.approx(2 / 3)
  out = metrics.retrieval_metrics(np.array([[0, 1]]), np.array([7]), np.array([7, 7, 7]), ks=(1,))
  assert out["num_queries_r_truncated"] == 1


def test_no_query_with_positives_gives_nan():
  rel = np.zeros((2, 3), bool)
  r = np.zeros(2, int)
  assert np.isnan(metrics.recall_at_k(rel, (1,), r)[1])
  assert np.isnan(metrics.map_at_r(rel, r))


def test_k_beyond_retrieved_columns_raises():
  with pytest.raises(ValueError):
    metrics.recall_at_k(np.zeros((1, 3), bool), (5,))


def test_leave_one_out_self_exclusion():
  # The catalogue is its own query set: item q must not count as its own match.
  labels = np.array(["a", "a", "b", "b", "b", "c"])
  ids = np.array([10, 11, 12, 13, 14, 15])
  r = metrics.num_relevant(labels, labels, query_ids=ids, gallery_ids=ids)
  # a: 2 items - self = 1; b: 3 - 1 = 2; c: 1 - 1 = 0 (no positives left).
  np.testing.assert_array_equal(r, [1, 1, 2, 2, 2, 0])
  # Even if a backend returned the query itself first, it is not a hit.
  retrieved = np.array([[0, 1], [0, 2], [2, 3], [4, 3], [4, 2], [5, 0]])
  rel = metrics.relevance_matrix(retrieved, labels, labels, query_ids=ids, gallery_ids=ids)
  np.testing.assert_array_equal(rel, [[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 0]])
  out = metrics.retrieval_metrics(retrieved, labels, labels, ks=(1, 2), query_ids=ids, gallery_ids=ids)
  assert out["num_queries"] == 5 and out["num_queries_without_positives"] == 1
  # Rank-1 hits among the 5 counted queries: q1, q3 -> 2/5.
  assert out["recall@1"] == pytest.approx(2 / 5)


def test_ids_only_exclude_the_same_item():
  # Query id 1 appears in the gallery with another label: nothing is removed.
  r = metrics.num_relevant(np.array([0]), np.array([0, 0, 5]), query_ids=np.array([1]),
                           gallery_ids=np.array([0, 2, 1]))
  np.testing.assert_array_equal(r, [2])


def test_recall_against_exact_by_hand():
  approx = np.array([[1, 2, 3], [4, 5, 6]])
  exact = np.array([[3, 1, 9], [6, -1, -1]])
  # Row 0 finds 3 and 1 (2 of 3); row 1 finds 6 (1 of 1, -1 ignored) -> 3/4.
  assert metrics.recall_against_exact(approx, exact) == pytest.approx(0.75)


def _brute_force(retrieved, q_labels, g_labels, ks):
  """A loop-by-loop reading of the definitions, independent of the module."""
  recalls = {k: [] for k in ks}
  aps, precs = [], []
  for q, row in enumerate(retrieved):
    r = sum(1 for g in g_labels if g == q_labels[q])
    if r == 0:
      continue
    rel = [int(i >= 0 and g_labels[i] == q_labels[q]) for i in row]
    for k in ks:
      recalls[k].append(float(any(rel[:k])))
    ap = 0.0
    for i in range(1, r + 1):
      if i <= len(rel) and rel[i - 1]:
        ap += sum(rel[:i]) / i
    aps.append(ap / r)
    precs.append(sum(rel[:r]) / r)
  out = {f"recall@{k}": np.mean(v) for k, v in recalls.items()}
  out["map@r"] = np.mean(aps)
  out["prec@r"] = np.mean(precs)
  return out


def test_matches_brute_force_on_random_rankings():
  rng = np.random.default_rng(0)
  g_labels = rng.integers(0, 12, 300)
  q_labels = rng.integers(0, 14, 80)  # Labels 12, 13 have no positives.
  retrieved = np.stack([rng.permutation(300)[:40] for _ in range(80)])
  retrieved[rng.random(retrieved.shape) < 0.05] = -1
  got = metrics.retrieval_metrics(retrieved, q_labels, g_labels, ks=(1, 5, 10))
  want = _brute_force(retrieved, q_labels, g_labels, (1, 5, 10))
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key
