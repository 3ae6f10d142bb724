"""Titles at search time: the titles of the top results re-rank the rest (pseudo-relevance feedback).

A query is a photo: it has no title. The documents it retrieves do, and the top few are usually
right, so their titles say what the query is. `rerank` rescores a first-stage candidate list:

    s(q, d)   first-stage score (image query . document embedding), candidates d_1..d_K
    top m     the m best candidates, d_1..d_m (by s)
    w_j       softmax((s_j - s_1) / temperature) over j = 1..m   (temperature 0.1: a factor 10)
    t_bar     sum_j w_j t_j                                        (t = unit title vectors)
    s'(q, d)  s(q, d) + weight * t_bar . t_d

and sorts the candidates by s'. Only the K candidates are rescored, so the cost is O(Q K T)
whatever the gallery size: exact search or ScaNN supplies K >= the metric depth (e.g. 100 or the
largest R of MAP@R) and this never looks outside it.

Title vectors (`title_vectors`) are text-tower pooled features centred by a mean (the training
titles' mean: the common direction every title shares would otherwise add a near-constant bonus
that only separates titled from untitled documents) and L2-normalised; a document without a title
is a zero row, so it gets no bonus and, as feedback, contributes nothing (it keeps its softmax
weight: an untitled top result dilutes the feedback instead of being skipped).

Contract: the candidate list is the only source of feedback. Documents excluded from a query
(its own row in leave-one-out evaluation) must already be absent from `candidates` -- as
`exact_search.exact_top_k(..., exclude=...)` and `ScannIndex.search(..., exclude=...)` return
them -- and then they are never used as feedback either.

Measured on cached frozen features of the Myntra sample (held-out products, leave-one-out, image
embedding cosine, MiniLM title vectors centred by the training-title mean): m=3, weight=0.4 lifts
same-title R@1 0.332 -> 0.366 and mAP@R 0.229 -> 0.289; m=1, weight=0.4 leaves R@1 unchanged and
mAP@R -> 0.293.
"""
from __future__ import annotations

import numpy as np

# Peak host memory of the gathered candidate title vectors: chunk queries so that
# chunk * K * T stays under this many floats (128 MiB of f32).
_GATHER_FLOATS = 1 << 25


def title_mean(pooled: np.ndarray, present: np.ndarray) -> np.ndarray | None:
  """f32[T]: the mean of the rows that have a title (e.g. the training split's); None if none do."""
  pooled, present = np.asarray(pooled, np.float32), np.asarray(present, bool)
  if not present.any():
    return None
  return pooled[present].mean(axis=0)


def title_vectors(pooled: np.ndarray, present: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
  """Title vectors for `rerank`: f32[G, T], unit rows, zero rows where there is no title.

  Args:
    pooled: f32[G, T] the text tower's pooled title features.
    present: bool[G] whether each row has a title (`tower_features.FeatureTable.present`,
      `models.title_present`).
    mean: f32[T] subtracted before normalising (pass the training titles' mean, `title_mean`),
      or None to leave the features uncentred.
  """
  x = np.asarray(pooled, np.float32)
  if mean is not None:
    x = x - np.asarray(mean, np.float32)[None, :]
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  keep = np.asarray(present, bool)[:, None] & (norm > 1e-12)
  return np.where(keep, x / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def configured(config) -> bool:
  """Is title feedback on in `config` (eval.title_feedback_docs and _weight > 0, and a text tower to read titles)?
  The one switch the training eval, the index and search all read."""
  return (config.eval.title_feedback_docs > 0 and config.eval.title_feedback_weight > 0
          and config.model.fusion != "image_only")


def gallery_title_vectors(pooled: np.ndarray, in_gallery: np.ndarray) -> np.ndarray:
  """`title_vectors` of every row, centred by the mean of the gallery's titled rows (zero rows: untitled).

  The gallery's own mean, not a training split's: what a search over this gallery can compute, on
  any catalogue (another retailer's titles share another common direction).
  """
  pooled = np.asarray(pooled, np.float32)
  present = np.any(pooled != 0, axis=1)
  return title_vectors(pooled, present, title_mean(pooled, present & np.asarray(in_gallery, bool)))


def rerank(query_scores: np.ndarray, candidates: np.ndarray, gallery_titles: np.ndarray, *,
           feedback_docs: int = 3, weight: float = 0.4,
           temperature: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Rescores each query's candidates with the titles of its top `feedback_docs` and re-sorts.

  Args:
    query_scores: f32[Q, K] first-stage scores of the candidates (any order; -inf where empty).
    candidates: int[Q, K] gallery row indices, -1 = no candidate. Documents excluded from a query
      (its own row in leave-one-out) must not appear (see the module docstring).
    gallery_titles: f32[G, T] unit title vectors (`title_vectors`), zero rows = no title.
    feedback_docs: m, the number of top candidates whose titles form the feedback vector.
    weight: beta, the scale of the title bonus.
    temperature: the softmax temperature over the top-m scores (relative to the best).

  Returns:
    (scores f32[Q, K], candidates int[Q, K]) sorted by the new score, best first; ties keep the
    first-stage order; -1 candidates stay last with their input scores. m=0 or weight=0 returns
    the inputs themselves, unchanged.
  """
  if feedback_docs <= 0 or weight == 0:
    return query_scores, candidates
  scores = np.asarray(query_scores, np.float32)
  cands = np.asarray(candidates)
  titles = np.asarray(gallery_titles, np.float32)
  if scores.shape != cands.shape or scores.ndim != 2:
    raise ValueError(f"query_scores {scores.shape} and candidates {cands.shape} must both be [Q, K]")
  if temperature <= 0:
    raise ValueError(f"temperature={temperature} must be positive")
  num_queries, k = scores.shape
  if k == 0 or num_queries == 0:
    return scores, cands
  valid = cands >= 0
  # First-stage order (stable: equal scores keep their list order), empty slots last.
  first = np.argsort(np.where(valid, -scores, np.inf), axis=1, kind="stable")
  scores = np.take_along_axis(scores, first, axis=1)
  cands = np.take_along_axis(cands, first, axis=1)
  valid = np.take_along_axis(valid, first, axis=1)

  m = min(int(feedback_docs), k)
  top_scores = np.where(valid[:, :m], scores[:, :m], -np.inf)
  with np.errstate(invalid="ignore"):  # a query without candidates: -inf - -inf, masked just below
    logits = (top_scores - top_scores[:, :1]) / np.float32(temperature)  # 0 for the best one
    w = np.where(valid[:, :m], np.exp(logits), 0.0)
  w = (w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)).astype(np.float32)  # a query with no candidate: 0

  safe = np.where(valid, cands, 0)
  bonus = np.zeros_like(scores)
  chunk = max(1, _GATHER_FLOATS // max(1, k * titles.shape[1]))
  for start in range(0, num_queries, chunk):
    rows = slice(start, start + chunk)
    t_bar = np.einsum("qm,qmt->qt", w[rows], titles[safe[rows, :m]])  # [q, T]
    bonus[rows] = np.matmul(titles[safe[rows]], t_bar[:, :, None])[..., 0]  # [q, K]
  new_scores = np.where(valid, scores + np.float32(weight) * bonus, scores).astype(np.float32)

  order = np.argsort(np.where(valid, -new_scores, np.inf), axis=1, kind="stable")
  return np.take_along_axis(new_scores, order, axis=1), np.take_along_axis(cands, order, axis=1)
