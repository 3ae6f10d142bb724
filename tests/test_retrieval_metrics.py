"""Retrieval metrics against hand-computed rankings and a brute-force reference."""
import numpy as np
import pytest

from oclear_jax.retrieval import metrics

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


# == Product1M: Prec@R, mAP@R, mAR@R (retrieval/product1m_metrics.py) ==========================
from oclear_jax.retrieval import exact_top_k  # noqa: E402
from oclear_jax.retrieval import product1m_metrics  # noqa: E402


def test_product1m_single_label_by_hand():
  # Same gallery and rankings as above (query 3 reordered so its empty slots sit at the end).
  retrieved = RETRIEVED.copy()
  retrieved[3] = [1, 5, -1, -1]  # rel 0 1 0 0; two non-empty slots
  out = product1m_metrics.product1m_metrics(retrieved, QUERY_LABELS, GALLERY_LABELS, cutoffs=(2, 4))
  # q0 (P=2) rel 0 1 0 1: k=min(R,2,4)=2 at both cut-offs -> Prec 1/2; AP: one hit at rank 2 -> (1/2)/1.
  # q1 (P=3) rel 1 1 0 1: R=2 -> k=2, Prec 1, AP (1 + 1)/2; R=4 -> k=3, Prec 2/3, AP still 1 (rank 4 is past k).
  # q3 (P=1) rel 0 1: k=1 at both -> Prec 0, AP 0.  q2 has no positive: left out.
  assert out["prec@2"] == pytest.approx((0.5 + 1 + 0) / 3)
  assert out["map@2"] == pytest.approx((0.5 + 1 + 0) / 3)
  assert out["prec@4"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
  assert out["map@4"] == pytest.approx((0.5 + 1 + 0) / 3)
  # mAR: one label each, E = min(R, G). q0: R=2 -> E=2, found 1 of the top 2 -> 1/2; R=4 -> E=2, found 2 -> 1.
  # q1: R=2 -> E=2, found 2 -> 1; R=4 -> E=3, found 3 -> 1.  q3: E=1, found 1 in the top 2 -> 1.
  assert out["mar@2"] == pytest.approx((0.5 + 1 + 1) / 3)
  assert out["mar@4"] == pytest.approx(1.0)


def test_product1m_multi_product_queries_must_cover_every_product():
  gallery = np.array(["A", "A", "A", "B", "B", "C"])
  queries = [["A", "B"], ["A", "B"], ["A", "A", "B"], ["A", "A", "B"]]
  retrieved = np.array([
      [0, 1, 2, 5, -1, -1],  # three A, no B
      [0, 3, 1, 4, -1, -1],  # two A, two B
      [0, 1, 3, 2, 5, 4],  # everything
      [3, 4, 0, 5, -1, -1],  # both B, one A
  ])
  out = product1m_metrics.product1m_metrics(retrieved, queries, gallery, cutoffs=(4, 6))
  # R=4, queries 0/1 list 2 labels: quota floor(4/2)=2 each; E_A=min(2,3)=2, E_B=min(2,2)=2.
  #   q0: A 3 -> min(1, 3/2)=1, B 0 -> 0: AR 1/2.  q1: 1 and 1 -> 1.
  # Queries 2/3 list A twice and B once: quota floor(4/3)=1, E_A=min(2*1,3)=2, E_B=min(1,2)=1.
  #   q2 top 4 [A A B A]: A 3 -> 1, B 1 -> 1: AR 1.  q3 top 4 [B B A C]: A 1/2, B min(1, 2/1)=1: AR 3/4.
  assert out["mar@4"] == pytest.approx((0.5 + 1 + 1 + 0.75) / 4)
  # R=6: q0/q1 quota 3: E_A=3, E_B=2. q0: A 3/3, B 0 -> 1/2. q1: A 2/3, B 2/2 -> 5/6.
  # q2/q3 quota 2: E_A=min(4,3)=3, E_B=2. q2: 1, 1 -> 1. q3: A 1/3, B 1 -> 2/3.
  assert out["mar@6"] == pytest.approx((0.5 + 5 / 6 + 1 + 2 / 3) / 4)
  # Positives: 5 documents (3 A + 2 B) for every query, counted once even when A is listed twice.
  # R=4: k=min(4,5,L). q0 L=4, rel 1 1 1 0 -> Prec 3/4, AP (1+1+1)/3=1. q1 rel 1 1 1 1 -> 1, 1.
  # q2 rel 1 1 1 1 -> 1, 1. q3 rel 1 1 1 0 -> 3/4, 1.
  assert out["prec@4"] == pytest.approx((0.75 + 1 + 1 + 0.75) / 4)
  assert out["map@4"] == pytest.approx(1.0)
  np.testing.assert_array_equal(metrics.num_relevant(queries, gallery), [5, 5, 5, 5])
  rel = metrics.relevance_matrix(retrieved, queries, gallery)
  np.testing.assert_array_equal(rel[3], [1, 1, 1, 0, 0, 0])


def test_product1m_queries_without_positives_or_quota_are_left_out():
  gallery = np.array([0, 0, 1])
  # q0 has no positive; q1 lists three labels but R=2 gives a quota of floor(2/3) = 0 per label.
  queries = [[7], [0, 1, 2]]
  retrieved = np.array([[0, 1, 2], [2, 0, 1]])
  out = product1m_metrics.product1m_metrics(retrieved, queries, gallery, cutoffs=(2,))
  assert np.isnan(out["mar@2"])
  # q1 alone is scored for Prec/mAP: P=3, k=2, both relevant.
  assert out["prec@2"] == pytest.approx(1.0) and out["map@2"] == pytest.approx(1.0)
  only_negatives = product1m_metrics.product1m_metrics(retrieved[:1], queries[:1], gallery, cutoffs=(2,))
  assert all(np.isnan(v) for v in only_negatives.values())


def test_product1m_cutoff_beyond_retrieved_columns_raises():
  with pytest.raises(ValueError, match="R=5"):
    product1m_metrics.product1m_metrics(np.zeros((1, 3), int), np.array([0]), np.array([0, 1, 2]), cutoffs=(5,))


def test_ties_go_to_the_lower_gallery_index():
  # Documents 0 and 1 have the same vector, so the query scores them equally; only document 1 is relevant.
  # The exact search ranks the tie by gallery index: with the relevant one second, rank 1 is a miss.
  query = np.array([[1.0, 0.0]], np.float32)
  gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  _, ranked = exact_top_k(query, gallery, 3)
  np.testing.assert_array_equal(ranked, [[0, 1, 2]])
  out = metrics.retrieval_metrics(ranked, np.array(["y"]), np.array(["x", "y", "z"]), ks=(1, 2))
  assert out["recall@1"] == 0.0 and out["recall@2"] == 1.0
  p1m = product1m_metrics.product1m_metrics(ranked, np.array(["y"]), np.array(["x", "y", "z"]), cutoffs=(1, 2))
  assert p1m["prec@1"] == 0.0 and p1m["map@2"] == 0.0  # k = min(R, P=1, L) = 1: only rank 1 counts
  # The same tie with the relevant document first in the gallery is a hit at rank 1.
  _, ranked = exact_top_k(query, gallery[[1, 0, 2]], 3)
  out = product1m_metrics.product1m_metrics(ranked, np.array(["y"]), np.array(["y", "x", "z"]), cutoffs=(1, 2))
  assert out["prec@1"] == 1.0 and out["map@2"] == 1.0


def _product1m_reference(retrieved, query_labels, g_labels, cutoffs):
  """A loop-by-loop reading of the definitions (Product1M's compute_p/compute_ap/compute_ar, summed over labels)."""
  out = {}
  for r in cutoffs:
    precs, aps, ars = [], [], []
    for q, row in enumerate(retrieved):
      labels = list(query_labels[q])
      pos = {i for i, g in enumerate(g_labels) if g in labels}
      if not pos:
        continue
      ranked = [i for i in row if i >= 0]
      k = min(r, len(pos), len(ranked))
      hits, ap = 0, 0.0
      for i in range(k):
        if ranked[i] in pos:
          hits += 1
          ap += hits / (i + 1)
      precs.append(hits / k if k else 0.0)
      aps.append(ap / hits if hits else 0.0)
      scores = []
      for c in set(labels):
        expected = min(labels.count(c) * (r // len(labels)), sum(1 for g in g_labels if g == c))
        if expected:
          found = sum(1 for i in ranked[:r] if g_labels[i] == c)
          scores.append(min(1.0, found / expected))
      if scores:
        ars.append(sum(scores) / len(scores))
    out[f"prec@{r}"], out[f"map@{r}"], out[f"mar@{r}"] = np.mean(precs), np.mean(aps), np.mean(ars)
  return out


def test_product1m_matches_loop_reference_on_random_multi_label_rankings():
  rng = np.random.default_rng(1)
  g_labels = rng.integers(0, 15, 200)
  query_labels = [list(rng.integers(0, 17, rng.integers(1, 4))) for _ in range(60)]  # 15, 16: absent
  retrieved = np.stack([rng.permutation(200)[:30] for _ in range(60)])
  retrieved[:5, 20:] = -1  # a few short lists
  got = product1m_metrics.product1m_metrics(retrieved, query_labels, g_labels, cutoffs=(1, 5, 10, 30))
  want = _product1m_reference(retrieved, query_labels, g_labels, (1, 5, 10, 30))
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key
