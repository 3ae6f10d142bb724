"""Product1M's instance-level retrieval metrics: Prec@R, mAP@R and mAR@R.

Product1M (Zhan et al., "Product1M: Towards Weakly Supervised Instance-Level Product
Retrieval via Cross-Modal Pretraining", ICCV 2021, arXiv:2107.14572) scores a ranked list
of products at cut-offs R = 10, 50, 100 (here: any `cutoffs`). The definitions follow the
authors' evaluation code (github.com/zhanxlin/Product1M, CAPTURE/evaluate_suit.py and
CAPTURE/evaluate_unit_v2.py: `compute_p`, `compute_ap`, `compute_ar`), which is where the
paper's prose is ambiguous. For a query q with P_q relevant documents in the gallery (its
"positive set": documents whose label is one of q's labels) and a list of L_q returned
documents:

* cut-off ``k = min(R, P_q, L_q)``: a query with 3 positives is not penalised for
  returning only 3 of them in its top 10;
* ``Prec@R = hits(k) / k``, hits(k) = relevant documents in the first k;
* ``AP@R = (1 / hits(k)) * sum_{i <= k, rel_i} hits(i) / i``: the precision at each hit,
  averaged over the hits (0 when there is none). This is *not* Musgrave's MAP@R
  (`metrics.map_at_r`, divided by R); both are reported, as ``map@r`` and ``map@{R}``;
* ``AR@R`` rewards covering every product of a multi-product photo: a query listing
  labels c_1..c_n (repeats allowed) expects, of each distinct label c,
  ``E_c = min(m_c * floor(R / n), G_c)`` documents in its top R (m_c: times c is listed,
  G_c: documents of label c in the gallery), and scores
  ``AR@R = mean over distinct c of min(1, found_c / E_c)`` with found_c the label-c
  documents among the first R slots. A photo of 2 products with R = 10 must show 5 of
  each: 10 of one product and none of the other scores 0.5, not 1.

mAP@R, Prec@R and mAR@R are the means over queries. Where we differ from the reference
code, deliberately:

* queries with no positive (P_q = 0) are left out of the means and counted in
  ``num_queries_without_positives`` (the reference code divides by zero on them and
  counts them as 0 anyway), as everywhere in this package;
* mAR sums over labels: the reference `compute_ar` assigns ``label_ap = ...`` inside its
  loop instead of adding, so only the last label found counts, against the paper's
  formula;
* a label with E_c = 0 (absent from the gallery, or R smaller than the number of labels)
  is left out of that query's mean instead of scoring 0; a query left with no label is
  left out of mAR@R;
* the positive set counts each document once even when the query lists its label twice.

Ties are read as ranked (see `metrics`); -1 slots are empty and sit at the end of a list,
so L_q is the number of non-empty slots. Leave-one-out evaluation passes ids as in
`metrics`: the query itself is never a positive and never counted as found.
"""
from collections.abc import Sequence

import numpy as np

from oclear_jax.retrieval import labels as labels_lib


def product1m_metrics(
    retrieved: np.ndarray,
    query_labels,
    gallery_labels: np.ndarray,
    cutoffs: Sequence[int] = (10, 50, 100),
    *,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
) -> dict[str, float]:
  """``prec@{R}``, ``map@{R}`` and ``mar@{R}`` for each cut-off R (NaN without a scorable query).

  Args:
    retrieved: int[Q, K] gallery indices, best first; -1 for empty slots. K must be at
      least max(cutoffs): a shorter list cannot say what the top R held.
    query_labels: [Q] labels, or one list of labels per query (multi-product photos).
    gallery_labels: [N] one label per document.
    cutoffs: the R values.
    query_ids: optional [Q] ids for leave-one-out self-exclusion (with gallery_ids).
    gallery_ids: optional [N].

  Returns:
    A flat dict of floats.
  """
  retrieved = np.asarray(retrieved)
  enc = labels_lib.encode(query_labels, gallery_labels)
  rel = labels_lib.relevance(enc, retrieved, query_ids, gallery_ids)
  per_pair_gallery = labels_lib.gallery_count_per_pair(enc, query_ids, gallery_ids)
  positives = np.bincount(enc.owner, weights=per_pair_gallery, minlength=enc.num_queries).astype(np.int64)
  scored = positives > 0
  list_len = ((retrieved >= 0) & ~labels_lib.self_mask(retrieved, query_ids, gallery_ids)).sum(axis=1)
  out = {}
  for r in cutoffs:
    if not 1 <= r <= retrieved.shape[1]:
      raise ValueError(f"cut-off R={r} outside [1, {retrieved.shape[1]}] retrieved columns; retrieve at least "
                       f"max(cutoffs) results per query")
    prec, ap = _precision_and_ap(rel[:, :r], np.minimum(np.minimum(r, positives), list_len))
    ar, has_ar = _average_recall(enc, retrieved, r, per_pair_gallery, query_ids, gallery_ids)
    out[f"prec@{r}"] = _mean(prec[scored])
    out[f"map@{r}"] = _mean(ap[scored])
    out[f"mar@{r}"] = _mean(ar[scored & has_ar])
  return out


def _mean(values: np.ndarray) -> float:
  return float(values.mean()) if values.size else float("nan")


def _precision_and_ap(rel: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-query Prec and AP over the first k[q] slots of rel (bool[Q, R])."""
  ranks = np.arange(1, rel.shape[1] + 1)
  within = ranks[None, :] <= k[:, None]
  hits_so_far = np.cumsum(rel & within, axis=1)
  hits = hits_so_far[:, -1] if rel.shape[1] else np.zeros(len(k), np.int64)
  prec = np.where(k > 0, hits / np.maximum(k, 1), 0.0)
  precision_at_hits = np.where(rel & within, hits_so_far / ranks, 0.0).sum(axis=1)
  ap = np.where(hits > 0, precision_at_hits / np.maximum(hits, 1), 0.0)
  return prec, ap


def _average_recall(enc: labels_lib.EncodedLabels, retrieved: np.ndarray, r: int, per_pair_gallery: np.ndarray,
                    query_ids, gallery_ids) -> tuple[np.ndarray, np.ndarray]:
  """(AR@R float[Q], whether the query has a label with a positive expected count)."""
  per_label_quota = r // np.maximum(enc.labels_per_query[enc.owner], 1)
  expected = np.minimum(enc.multiplicity * per_label_quota, per_pair_gallery)
  found = labels_lib.retrieved_count_per_pair(enc, retrieved, r, query_ids, gallery_ids)
  ok = expected > 0
  ratio = np.minimum(1.0, found[ok] / np.maximum(expected[ok], 1))
  labels_scored = np.bincount(enc.owner[ok], minlength=enc.num_queries)
  total = np.bincount(enc.owner[ok], weights=ratio, minlength=enc.num_queries)
  return total / np.maximum(labels_scored, 1), labels_scored > 0
