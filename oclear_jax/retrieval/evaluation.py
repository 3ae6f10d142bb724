"""The retrieval evaluator: embed held-out queries and gallery documents, search, score.

Like big_vision's evaluators it receives a predict function, never the model:
`predict_fn(device_batch) -> {'query': f32[B, d], 'doc': f32[B, d]}` computes the shared image
tower once and both heads. Queries are the eval split's shopper photos (kind == query) searched
against its documents; a catalogue without queries (e.g. a plain product catalogue) is evaluated
leave-one-out: every document's image queries all *other* documents.

With title vectors (`title_feedback.title_vectors`, one per EvalSet row) and feedback on,
`search_and_score` also re-ranks the exact top-k by the titles of each query's top results
(`title_feedback.rerank`) and reports those metrics under ``prf/`` beside the plain ones.

On N processes each embeds its share of the split and every process gets the whole `EvalSet`
(`host_gather`); `search_and_score` is a plain host function the caller runs once (process 0).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from input_pipeline import paths
from oclear_jax.retrieval import exact_search
from oclear_jax.distributed import host_gather
from oclear_jax.retrieval import metrics as metrics_lib
from oclear_jax.retrieval import plots
from oclear_jax.retrieval import product1m_metrics
from oclear_jax.retrieval import scann_search
from oclear_jax.retrieval import title_feedback

QUERY, DOC = 1, 0


@dataclasses.dataclass
class EvalSet:
  ids: np.ndarray
  labels: np.ndarray
  kinds: np.ndarray
  titles: np.ndarray
  query_emb: np.ndarray
  doc_emb: np.ndarray
  # f32[N, T] the text tower's pooled titles, zero rows = no title; only when predict_fn returns 'title'.
  title_pooled: np.ndarray | None = None


EVAL_INPUTS = ("image", "title_tokens", "label", "kind")
EVAL_COLUMNS = ("id", "label", "kind", "title")
_OUT = "out/"  # gathered outputs, apart from the batch's columns ('title' is both a column and an output)


def _prefixed(predict_fn: Callable) -> Callable:
  return lambda batch: {_OUT + k: v for k, v in predict_fn(batch).items()}


def embed_eval_set(batches: Iterable[dict[str, np.ndarray]], predict_fn: Callable, place_fn: Callable,
                   batch_size: int) -> EvalSet:
  """Embeds every eval example, on every process; each process feeds its share of each global batch.

  `batches`: this process's round-robin share of the split (all of it with one process; the
  pipeline's process sharding on N), in batches of `batch_size / process_count` rows at most.
  The short last batches are padded (static shapes) and the padding dropped; rows come back in
  the split's order whatever the process count (`host_gather.MeshEmbedder.stream`).
  A `predict_fn` that also returns 'title' (f32[B, T], zero where a row has no title) fills
  `EvalSet.title_pooled`.
  """
  embedder = host_gather.MeshEmbedder(_prefixed(predict_fn), place_fn, batch_size, EVAL_INPUTS)
  rows = embedder.stream(batches, columns=EVAL_COLUMNS)
  if not rows:
    raise ValueError("the eval split is empty: no evaluation possible (check data.eval_fraction / the split column)")
  return EvalSet(ids=rows["id"], labels=rows["label"], kinds=rows["kind"], titles=rows["title"],
                 query_emb=rows[_OUT + "query"], doc_emb=rows[_OUT + "doc"], title_pooled=rows.get(_OUT + "title"))


def embed_table(batch_of: Callable[[np.ndarray], dict[str, np.ndarray]], num_rows: int, predict_fn: Callable,
                place_fn: Callable, batch_size: int, inputs: Sequence[str]) -> dict[str, np.ndarray]:
  """`predict_fn`'s outputs for rows 0 .. num_rows - 1 of an in-memory table (`batch_of(rows)`),
  in row order, on every process; each process embeds its round-robin share."""
  embedder = host_gather.MeshEmbedder(predict_fn, place_fn, batch_size, inputs)
  mine, size = host_gather.share_rows(num_rows), embedder.local_size
  return embedder.stream(batch_of(mine[s:s + size]) for s in range(0, len(mine), size))


@dataclasses.dataclass
class SearchResult:
  metrics: dict[str, float]
  query_rows: np.ndarray  # indices into the EvalSet
  gallery_rows: np.ndarray
  retrieved: np.ndarray  # [Q, k] indices into gallery_rows (-1 = empty)
  scores: np.ndarray


def search_and_score(es: EvalSet, *, ks=(1, 5, 10), use_scann: bool = True, max_k: int = 1000,
                     scann_dir: str | None = None, cutoffs=(10, 50, 100),
                     scann_params: dict | None = None, title_vectors: np.ndarray | None = None,
                     feedback_docs: int = 0, feedback_weight: float = 0.4) -> SearchResult:
  """Exact search is ground truth; ScaNN is scored against the labels and against exact.

  Metrics: Recall@K for `ks`, Musgrave's MAP@R / R-precision (``map@r``, ``prec@r``) and
  Product1M's Prec@R, mAP@R, mAR@R for each R in `cutoffs` (see `product1m_metrics`).
  `scann_params` are `ScannIndex.build` keyword arguments (`scann_search.params_from_config`).

  Title feedback: with `title_vectors` f32[N, T] (one per EvalSet row, `title_feedback.title_vectors`),
  `feedback_docs` > 0 and `feedback_weight` > 0, the exact top-k (the same k as the metrics', so it
  covers every cutoff and R) is re-ranked by `title_feedback.rerank` and scored again into
  ``prf/<metric>``; leave-one-out's exclusion already keeps a query's own row out of its list, and so
  out of its feedback. The returned ranking stays the plain one.
  """
  gallery_rows = np.flatnonzero(es.kinds == DOC)
  query_rows = np.flatnonzero(es.kinds == QUERY)
  leave_one_out = len(query_rows) == 0
  if leave_one_out:
    query_rows = gallery_rows
  queries, gallery = es.query_emb[query_rows], es.doc_emb[gallery_rows]
  q_labels, g_labels = es.labels[query_rows], es.labels[gallery_rows]
  q_ids, g_ids = es.ids[query_rows], es.ids[gallery_rows]
  exclude = (q_ids, g_ids) if leave_one_out else None
  # k must cover the largest R (number of relevant documents) for MAP@R, capped for big galleries.
  counts = np.unique(g_labels, return_counts=True)
  max_r = int(counts[1].max()) if len(counts[1]) else 1
  cutoffs = tuple(cutoffs or ())
  longest = max(max(ks), *cutoffs) if cutoffs else max(ks)
  k = int(min(max(longest, max_r), max(max_k, longest)))
  scores, retrieved = exact_search.exact_top_k(queries, gallery, k, exclude=exclude)
  scores, retrieved = np.asarray(scores), np.asarray(retrieved)
  loo_ids = dict(query_ids=q_ids, gallery_ids=g_ids) if leave_one_out else dict(query_ids=None, gallery_ids=None)

  def score(ranked: np.ndarray) -> dict[str, float]:
    out = dict(metrics_lib.retrieval_metrics(ranked, q_labels, g_labels, ks=ks, **loo_ids))
    if cutoffs:
      out.update(product1m_metrics.product1m_metrics(ranked, q_labels, g_labels, cutoffs, **loo_ids))
    return out

  result = score(retrieved)
  if title_vectors is not None and feedback_docs > 0 and feedback_weight > 0:
    _, reranked = title_feedback.rerank(scores, retrieved, np.asarray(title_vectors)[gallery_rows],
                                        feedback_docs=feedback_docs, weight=feedback_weight)
    result.update({f"prf/{name}": value for name, value in score(reranked).items()})
  result["num_gallery"] = float(len(gallery_rows))
  result["leave_one_out"] = float(leave_one_out)
  if use_scann:
    index = scann_search.ScannIndex.build(gallery, k=max(ks), **(scann_params or {}))
    _, ann = index.search(queries, max(ks), exclude=exclude)
    ann = np.asarray(ann)
    ann_metrics = metrics_lib.retrieval_metrics(ann, q_labels, g_labels, ks=ks)
    result.update({f"scann/{k_}": v for k_, v in ann_metrics.items() if k_.startswith("recall@")})
    k_cmp = min(10, max(ks))
    result[f"scann/recall_vs_exact@{k_cmp}"] = metrics_lib.recall_against_exact(ann[:, :k_cmp], retrieved[:, :k_cmp])
    if scann_dir:
      index.save(scann_dir)
  return SearchResult(metrics=result, query_rows=query_rows, gallery_rows=gallery_rows,
                      retrieved=retrieved, scores=scores)


def search_and_score_as_configured(config, es: EvalSet, *, use_scann: bool, scann_dir: str | None = None,
                                   title_vectors: np.ndarray | None = None) -> SearchResult:
  """`search_and_score` with config.eval's depths and title feedback and config.index's ScaNN knobs."""
  return search_and_score(
      es, ks=tuple(config.eval.ks), use_scann=use_scann, scann_dir=scann_dir, cutoffs=tuple(config.eval.cutoffs),
      scann_params=scann_search.params_from_config(config.index), title_vectors=title_vectors,
      feedback_docs=config.eval.title_feedback_docs, feedback_weight=config.eval.title_feedback_weight)


def write_contact_sheet(es: EvalSet, sr: SearchResult, images_by_id: dict[str, np.ndarray], path: str,
                        num_queries: int, top: int = 5) -> None:
  """Query -> top-`top` documents with titles; green = same category, red = not."""
  rows = []
  query_images = []
  captions = []
  for qi in range(min(num_queries, len(sr.query_rows))):
    q_row = sr.query_rows[qi]
    query_images.append(images_by_id[es.ids[q_row]])
    captions.append(f"query {_text(es.ids[q_row])}")
    results = []
    for rank in range(min(top, sr.retrieved.shape[1])):
      g = sr.retrieved[qi, rank]
      if g < 0:
        continue
      g_row = sr.gallery_rows[g]
      caption = f"{_text(es.titles[g_row]) or '(no title)'} | {sr.scores[qi, rank]:.2f}"
      results.append((images_by_id[es.ids[g_row]], caption, bool(es.labels[g_row] == es.labels[q_row])))
    rows.append(results)
  plots.contact_sheet(query_images, rows, path, query_captions=captions)


def contact_sheet_ids(es: EvalSet, sr: SearchResult, num_queries: int, top: int = 5) -> set[str]:
  wanted = set()
  for qi in range(min(num_queries, len(sr.query_rows))):
    wanted.add(es.ids[sr.query_rows[qi]])
    wanted.update(es.ids[sr.gallery_rows[g]] for g in sr.retrieved[qi, :top] if g >= 0)
  return wanted


def _text(value) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def save_metrics(path: str, step: int, metrics: dict[str, float]) -> None:
  paths.makedirs(os.path.dirname(path))
  with paths.open(path, "w") as f:
    json.dump({"step": int(step), **metrics}, f, indent=2, sort_keys=True)
  logging.info("Eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
