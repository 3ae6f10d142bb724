"""The retrieval evaluator: embed held-out queries and gallery documents, search, score.

Like big_vision's evaluators it receives a predict function, never the model:
`predict_fn(device_batch) -> {'query': f32[B, d], 'doc': f32[B, d]}` computes the shared image
tower once and both heads. Queries are the eval split's shopper photos (kind == query) searched
against its documents; a catalogue without queries (e.g. a plain product catalogue) is evaluated
leave-one-out: every document's image queries all *other* documents.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable

import numpy as np

from oclear_jax.evaluators import exact_search
from oclear_jax.evaluators import metrics as metrics_lib
from oclear_jax.evaluators import plots
from oclear_jax.evaluators import product1m_metrics
from oclear_jax.evaluators import scann_search

QUERY, DOC = 1, 0


@dataclasses.dataclass
class EvalSet:
  ids: np.ndarray
  labels: np.ndarray
  kinds: np.ndarray
  titles: np.ndarray
  query_emb: np.ndarray
  doc_emb: np.ndarray


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], int]:
  n = len(batch["label"])
  if n == size:
    return batch, n
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}, n


def embed_eval_set(batches: Iterable[dict[str, np.ndarray]], predict_fn: Callable, place_fn: Callable,
                   batch_size: int) -> EvalSet:
  """Embeds every eval example; the last short batch is padded to keep shapes static."""
  cols = {k: [] for k in ("ids", "labels", "kinds", "titles", "query_emb", "doc_emb")}
  for batch in batches:
    padded, n = _pad_batch({k: batch[k] for k in ("image", "title_tokens", "label", "kind")}, batch_size)
    out = predict_fn(place_fn(padded))
    cols["query_emb"].append(np.asarray(out["query"])[:n])
    cols["doc_emb"].append(np.asarray(out["doc"])[:n])
    cols["ids"].append(batch["id"][:n])
    cols["labels"].append(batch["label"][:n])
    cols["kinds"].append(batch["kind"][:n])
    cols["titles"].append(batch["title"][:n])
  if not cols["ids"]:
    raise ValueError("the eval split is empty: no evaluation possible (check data.eval_fraction / the split column)")
  return EvalSet(**{k: np.concatenate(v) for k, v in cols.items()})


@dataclasses.dataclass
class SearchResult:
  metrics: dict[str, float]
  query_rows: np.ndarray  # indices into the EvalSet
  gallery_rows: np.ndarray
  retrieved: np.ndarray  # [Q, k] indices into gallery_rows (-1 = empty)
  scores: np.ndarray


def search_and_score(es: EvalSet, *, ks=(1, 5, 10), use_scann: bool = True, max_k: int = 1000,
                     scann_dir: str | None = None, cutoffs=(10, 50, 100),
                     scann_params: dict | None = None) -> SearchResult:
  """Exact search is ground truth; ScaNN is scored against the labels and against exact.

  Metrics: Recall@K for `ks`, Musgrave's MAP@R / R-precision (``map@r``, ``prec@r``) and
  Product1M's Prec@R, mAP@R, mAR@R for each R in `cutoffs` (see `product1m_metrics`).
  `scann_params` are `ScannIndex.build` keyword arguments (`scann_search.params_from_config`).
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
  result = dict(metrics_lib.retrieval_metrics(
      retrieved, q_labels, g_labels, ks=ks, query_ids=q_ids if leave_one_out else None,
      gallery_ids=g_ids if leave_one_out else None))
  if cutoffs:
    result.update(product1m_metrics.product1m_metrics(
        retrieved, q_labels, g_labels, cutoffs, query_ids=q_ids if leave_one_out else None,
        gallery_ids=g_ids if leave_one_out else None))
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
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"step": int(step), **metrics}, f, indent=2, sort_keys=True)
  logging.info("Eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
