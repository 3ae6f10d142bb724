"""A labelled catalogue scored as it is served: one model's rows embedded once, searched, re-ranked by titles.

What `--mode=evaluate` scores (`commands/evaluate.py` picks the models). Every row with a label is a
query (its image, through the query head) against every other row as a document (its image and
title, through the fusion and the document head), leave-one-out; where the catalogue has `kind`
query/doc rows, the query rows search the documents. One pass of the model over the rows
(`trained_run.HEADS['views_and_towers']`) gives both views, the image tower's pooled features (the
frozen row: cosine of those) and the text tower's pooled titles (title feedback).

Scoring is the training eval's (`retrieval.evaluation.search_and_score_as_configured`): exact
search ranks (the searcher `--mode=index` builds for a gallery of at most
`index.exact_max_documents` documents), ScaNN is scored against it, and title feedback re-ranks the
exact top-k with the titles of each query's top `eval.title_feedback_docs` results into prf/ metrics.
Title vectors are centred by the gallery's own titled documents (`title_feedback.gallery_title_vectors`),
which any catalogue has, labelled or not.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from input_pipeline import catalogue as catalogue_lib
from oclear_jax.retrieval import evaluation
from oclear_jax.retrieval import title_feedback
from oclear_jax.serving import catalogue_embedding
from oclear_jax.serving import composition as composition_lib


@dataclasses.dataclass
class Scored:
  """One row of the table: a model's embeddings of the catalogue and their search result."""
  name: str
  eval_set: evaluation.EvalSet
  result: evaluation.SearchResult

  @property
  def metrics(self) -> dict[str, float]:
    return self.result.metrics


def labelled_rows(config: ml_collections.ConfigDict, csv_path: str, *, columns: catalogue_lib.CatalogueColumns,
                  split: str | None) -> tuple[catalogue_lib.CatalogueReadResult, dict[str, int]]:
  """The rows with a label (rows without one are skipped and counted), of `split` alone when given."""
  read = catalogue_embedding.read_rows(config, csv_path, columns=columns)
  counts = {"rows_read": read.counts["rows_read"], "skipped_empty_label": read.counts["skipped_empty_label"],
            "other_split": 0}
  if split:
    kept = [row for row in read.rows if row.split == split]
    counts["other_split"] = len(read.rows) - len(kept)
    if not kept:
      raise ValueError(f"catalogue {csv_path} has no row of split {split!r} (splits: "
                       f"{sorted({r.split for r in read.rows})}); pass another --split, or none for every row")
    read = dataclasses.replace(read, rows=kept)
  if len(read.rows) < 2:
    raise ValueError(f"catalogue {csv_path} has {len(read.rows)} labelled row(s): evaluation needs at least two "
                     f"(is config.data.columns.label={columns.label!r} the label column?)")
  return read, counts


def eval_set(embedded: catalogue_embedding.EmbeddedCatalogue, queries: np.ndarray,
             documents: np.ndarray) -> evaluation.EvalSet:
  """The embedded rows as an EvalSet of these query and document vectors, `title_pooled` from the same pass."""
  kinds = np.asarray([evaluation.QUERY if r.kind == "query" else evaluation.DOC for r in embedded.rows], np.int32)
  return evaluation.EvalSet(
      ids=np.asarray(embedded.ids), labels=np.asarray(embedded.labels), kinds=kinds,
      titles=np.asarray(embedded.titles), query_emb=queries, doc_emb=documents,
      title_pooled=embedded.outputs.get("title"))


def frozen_vectors(embedded: catalogue_embedding.EmbeddedCatalogue) -> tuple[np.ndarray, np.ndarray]:
  """The image tower's unit pooled features, for queries and documents alike: the frozen row."""
  pooled = embedded.outputs["pooled"]
  unit = (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)
  return unit, unit


def composed(config: ml_collections.ConfigDict, embedded: catalogue_embedding.EmbeddedCatalogue
             ) -> tuple[composition_lib.Composition, dict, tuple[np.ndarray, np.ndarray]]:
  """(the composition `composition.weigh` picks on the catalogue's documents, its evidence, the served vectors)."""
  docs = np.asarray([r.kind != "query" for r in embedded.rows])
  chosen, evidence = composition_lib.weigh(config.model, embedded.outputs, documents=docs, seed=config.seed)
  return chosen, evidence, composition_lib.served_vectors(config.model, embedded.outputs, chosen)


def score(config: ml_collections.ConfigDict, name: str, es: evaluation.EvalSet) -> Scored:
  """Searches and scores `es` as configured, with title feedback where the model has titles."""
  vectors = None
  if es.title_pooled is not None:
    vectors = title_feedback.gallery_title_vectors(es.title_pooled, es.kinds == evaluation.DOC)
  result = evaluation.search_and_score_as_configured(config, es, use_scann=config.eval.scann, title_vectors=vectors)
  return Scored(name=name, eval_set=es, result=result)
