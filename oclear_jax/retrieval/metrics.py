"""Retrieval metrics on ranked lists: Recall@K, MAP@R and R-precision.

Everything here is plain numpy on host arrays, so the numbers do not depend on
which search backend (exact JAX, ScaNN) produced the rankings. Product1M's
Prec@R, mAP@R and mAR@R live in `product1m_metrics`; both share the label
encoding of `labels`.

Conventions shared by every function:

* ``retrieved`` is ``int[Q, K]``: row ``q`` lists gallery indices best first.
  ``-1`` marks an empty slot (the gallery had fewer than K candidates, or a
  slot was freed by self-exclusion); an empty slot is never relevant.
* A gallery item is *relevant* to a query when its label is one of the
  query's labels: one label per query (a 1-D array), or several for photos of
  several products (see `labels` for the accepted forms). Labels may be any
  numpy-comparable dtype (ints, strings).
* Ties: the metrics read the ranking as given and never re-sort it. Equal
  scores are ordered by the search that produced the ranking; the exact
  search (`exact_search`) puts the lower gallery index first, so with it a
  tie between a relevant and an irrelevant document is decided by their
  order in the gallery, deterministically, not in the query's favour.
* Leave-one-out evaluation (a catalogue with no separate query set, where
  every item queries all the others) passes ``query_ids`` / ``gallery_ids``:
  a gallery item whose id equals the query's id is the query itself. The
  search layer removes it from the ranking, and the functions here neither
  count it as relevant nor, should it still appear, score it as relevant.
* Queries with no relevant item in the gallery (R = 0) have undefined recall
  and AP; they are left out of every mean and reported separately as
  ``num_queries_without_positives``, so a metric is never inflated or
  deflated by queries that could not possibly succeed.
"""
from collections.abc import Sequence

import numpy as np

from oclear_jax.retrieval import labels as labels_lib


def relevance_matrix(
    retrieved: np.ndarray,
    query_labels,
    gallery_labels: np.ndarray,
    *,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
) -> np.ndarray:
  """Marks which retrieved slots hold a relevant gallery item.

  ``rel[q, j] = retrieved[q, j] >= 0 and
  gallery_labels[retrieved[q, j]] in labels(q)`` and, when ids are given,
  ``gallery_ids[retrieved[q, j]] != query_ids[q]`` (the query itself is
  never a hit, even if a search backend failed to remove it).

  Args:
    retrieved: int[Q, K] gallery indices, best first; -1 for empty slots.
    query_labels: the queries' labels: [Q], or one list of labels per query.
    gallery_labels: [N] labels of the gallery items.
    query_ids: optional [Q] ids for self-exclusion.
    gallery_ids: optional [N] ids for self-exclusion.

  Returns:
    bool[Q, K].
  """
  enc = labels_lib.encode(query_labels, gallery_labels)
  return labels_lib.relevance(enc, retrieved, query_ids, gallery_ids)


def num_relevant(
    query_labels,
    gallery_labels: np.ndarray,
    *,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
) -> np.ndarray:
  """Counts the relevant gallery items of each query (R in MAP@R).

  ``R[q] = #{n : gallery_labels[n] in labels(q)}``, minus, when ids are
  given, the gallery items that are the query itself
  (``gallery_ids[n] == query_ids[q]`` with one of its labels). Runs in
  O((Q + N) log(Q + N)) via label histograms, never forming a [Q, N] matrix,
  so it scales to million-item catalogues.

  Args:
    query_labels: the queries' labels: [Q], or one list of labels per query.
    gallery_labels: [N] labels.
    query_ids: optional [Q] ids for leave-one-out self-exclusion.
    gallery_ids: optional [N] ids for leave-one-out self-exclusion.

  Returns:
    int64[Q].
  """
  enc = labels_lib.encode(query_labels, gallery_labels)
  return labels_lib.positives_per_query(enc, query_ids, gallery_ids)


def _has_positives(relevance: np.ndarray, num_rel: np.ndarray | None) -> np.ndarray:
  if num_rel is None:
    return np.ones(relevance.shape[0], bool)
  num_rel = np.asarray(num_rel)
  if num_rel.shape != (relevance.shape[0],):
    raise ValueError(f"num_relevant must be [{relevance.shape[0]}], got {num_rel.shape}")
  return num_rel > 0


def recall_at_k(
    relevance: np.ndarray,
    ks: Sequence[int],
    num_relevant: np.ndarray | None = None,  # pylint: disable=redefined-outer-name
) -> dict[int, float]:
  """Recall@K in the metric-learning sense (a.k.a. hit rate / success@K).

  ``recall@k = mean over queries with R > 0 of [any(relevance[q, :k])]``:
  the fraction of queries with at least one relevant item in the top k. Not
  the IR recall |relevant ∩ top-k| / R, which a single near-duplicate product
  would make near-zero for large classes.

  Args:
    relevance: bool[Q, K] from `relevance_matrix`.
    ks: cut-offs; each must be <= K (a shorter list cannot tell us the answer).
    num_relevant: optional int[Q]; queries with 0 are excluded from the mean.
      Without it every query counts.

  Returns:
    {k: recall}; NaN when no query has a positive.
  """
  relevance = np.asarray(relevance, bool)
  keep = _has_positives(relevance, num_relevant)
  out = {}
  for k in ks:
    if not 1 <= k <= relevance.shape[1]:
      raise ValueError(f"k={k} outside [1, {relevance.shape[1]}] retrieved columns")
    hit = relevance[keep, :k].any(axis=1)
    out[int(k)] = float(hit.mean()) if hit.size else float("nan")
  return out


def _precision_terms(relevance: np.ndarray, num_rel: np.ndarray):
  """Shared pieces of MAP@R and Prec@R for the queries with R > 0."""
  relevance = np.asarray(relevance, bool)
  keep = _has_positives(relevance, num_rel)
  rel = relevance[keep]
  r = np.asarray(num_rel)[keep].astype(np.int64)
  hits_so_far = np.cumsum(rel, axis=1)  # [Q', K]: relevant items in top i.
  return rel, r, hits_so_far


def map_at_r(relevance: np.ndarray, num_relevant: np.ndarray) -> float:  # pylint: disable=redefined-outer-name
  """MAP@R of Musgrave et al. 2020, "A Metric Learning Reality Check".

  For a query with R relevant gallery items:
  ``AP@R = (1/R) * sum_{i=1..R} P@i * rel_i`` with ``P@i`` the precision of
  the top i. Unlike plain MAP it only looks at the first R slots, and unlike
  Recall@K it rewards ranking *all* positives first. MAP@R is the mean over
  queries with R > 0.

  The caller should retrieve K >= max R columns. If a row is shorter than R,
  positions beyond K count as non-relevant, which makes the value a lower
  bound (`retrieval_metrics` reports how many queries were truncated).

  Args:
    relevance: bool[Q, K].
    num_relevant: int[Q], the R of each query.

  Returns:
    MAP@R; NaN when no query has a positive.
  """
  rel, r, hits = _precision_terms(relevance, num_relevant)
  if not len(r):
    return float("nan")
  ranks = np.arange(1, rel.shape[1] + 1)
  within_r = ranks[None, :] <= r[:, None]
  ap = (hits / ranks * rel * within_r).sum(axis=1) / r
  return float(ap.mean())


def r_precision(relevance: np.ndarray, num_relevant: np.ndarray) -> float:  # pylint: disable=redefined-outer-name
  """Prec@R (R-precision): mean over queries with R > 0 of (hits in top R) / R.

  Slots beyond the K retrieved columns count as non-relevant, as in `map_at_r`.
  """
  rel, r, hits = _precision_terms(relevance, num_relevant)
  if not len(r):
    return float("nan")
  if rel.shape[1] == 0:
    return 0.0
  col = np.minimum(r, rel.shape[1]) - 1
  return float((hits[np.arange(len(r)), col] / r).mean())


def recall_against_exact(approx_indices: np.ndarray, exact_indices: np.ndarray) -> float:
  """Fraction of the exact top-k neighbours that the approximate search found.

  The standard ANN quality number: ``|approx_q ∩ exact_q| / |exact_q|`` pooled
  over all queries, where -1 (empty) slots of the exact lists are ignored. The
  approximate lists may be longer than the exact ones (k' >= k).
  """
  approx = np.asarray(approx_indices)
  exact = np.asarray(exact_indices)
  if approx.shape[0] != exact.shape[0]:
    raise ValueError(f"query counts differ: {approx.shape[0]} vs {exact.shape[0]}")
  found, total = 0, 0
  step = max(1, 4_000_000 // max(1, approx.shape[1] * exact.shape[1]))
  for s in range(0, exact.shape[0], step):
    a, e = approx[s:s + step], exact[s:s + step]
    valid = e >= 0
    hit = (e[:, :, None] == a[:, None, :]).any(axis=2) & valid
    found += int(hit.sum())
    total += int(valid.sum())
  return found / total if total else float("nan")


def retrieval_metrics(
    retrieved: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
) -> dict[str, float]:
  """All retrieval metrics for one ranking, as a flat dict for logging.

  Keys: ``recall@{k}`` for each k, ``map@r``, ``prec@r``, ``num_queries``
  (queries with R > 0, the denominator of every mean),
  ``num_queries_without_positives`` (excluded queries) and
  ``num_queries_r_truncated`` (queries with R > K, for which MAP@R/Prec@R are
  lower bounds: retrieve more columns to make it 0).
  """
  rel = relevance_matrix(
      retrieved, query_labels, gallery_labels, query_ids=query_ids, gallery_ids=gallery_ids)
  r = num_relevant(query_labels, gallery_labels, query_ids=query_ids, gallery_ids=gallery_ids)
  out = {f"recall@{k}": v for k, v in recall_at_k(rel, ks, r).items()}
  out["map@r"] = map_at_r(rel, r)
  out["prec@r"] = r_precision(rel, r)
  out["num_queries"] = float((r > 0).sum())
  out["num_queries_without_positives"] = float((r == 0).sum())
  out["num_queries_r_truncated"] = float((r > rel.shape[1]).sum())
  return out
