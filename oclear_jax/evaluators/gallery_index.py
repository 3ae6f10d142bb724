"""The document index of a trained run: the whole catalogue embedded and searchable with ScaNN.

The gallery is every document (catalogue image + title) in the run's records, train *and*
eval splits: a shopper searches the whole catalogue, not the held-out fifth the eval numbers
are computed on. With `catalogue=CSV` (`--mode=index --catalogue=...`) it is instead every
readable row of that CSV (any catalogue, read like `--mode=embed` does; split 'catalogue', label
'' without a label column), embedded in memory and then written as the same export. Layout of
`{workdir}/index/`:

  documents/       embedding export (`export`): doc-head vectors + id, title, label, split
  queries/         the eval split's shopper photos (query head): the set that measures
                   ScaNN's recall against exact search and the catalogue-wide metrics
  image_paths.npy  the catalogue image of each document row (UTF-8 bytes; '' if unknown),
                   read from the catalogue CSV, for contact sheets
  scann/           the serialized ScaNN searcher
  index.json       written last (its presence means "complete"): checkpoint step,
                   counts, ScaNN settings, recall against exact, metrics

Both exports of the run's records resume shard by shard (`export`), so an interrupted index
build restarts where it stopped; their fingerprint covers the records, the checkpoint and the
preprocessing, so a newer checkpoint re-embeds. With N processes every process reads the
gallery and embeds its share of each batch (`export`, `host_gather`); process 0 alone writes the
files and builds the ScaNN index, once, which `search` loads. Queries and documents must come
from the same checkpoint, so `GalleryIndex.step` tells `search` which checkpoint to embed
queries with.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from oclear_jax import datasets
from oclear_jax import inference
from oclear_jax import multihost
from oclear_jax.evaluators import exact_search
from oclear_jax.evaluators import export
from oclear_jax.evaluators import host_gather
from oclear_jax.evaluators import metrics as metrics_lib
from oclear_jax.evaluators import product1m_metrics
from oclear_jax.evaluators import scann_search

INDEX_DIR = "index"
MANIFEST = "index.json"
DOC_COLUMNS = ("id", "title", "label", "split")


def records_source(records_dir: str, parts: list[tuple[str, str]], batch_size: int,
                   preprocess: str) -> tuple[Callable[[int], Iterator[dict]], int]:
  """(`source(start_row)`, total) over the (split, kind) parts of the records, in that order."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
  counts = [(split, kind, pipeline.count_examples(records_dir, split, kind)) for split, kind in parts]

  def source(start: int) -> Iterator[dict]:
    offset = 0
    for split, kind, n in counts:
      if start < offset + n:
        ds = pipeline.make_dataset(records_dir, split, batch_size=batch_size, preprocess=preprocess, shuffle=False,
                                   repeat=False, drop_remainder=False, kinds=kind,
                                   skip_examples=max(0, start - offset))
        for batch in ds.as_numpy_iterator():
          batch["split"] = np.full(len(batch["id"]), split.encode())
          yield batch
      offset += n
  return source, sum(n for _, _, n in counts)


def _fingerprint(prepared: datasets.PreparedData, config: ml_collections.ConfigDict, workdir: str, step: int,
                 head: str) -> str:
  ckpt = os.path.join(workdir, "checkpoints", str(step))
  stamp = os.stat(ckpt).st_mtime_ns if os.path.exists(ckpt) else 0
  blob = json.dumps({"records": prepared.summary.get("fingerprint"), "step": step, "checkpoint_mtime": stamp,
                     "preprocess": config.data.eval_preprocess, "model": config.model.to_json_best_effort(),
                     "head": head}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def _image_paths(config: ml_collections.ConfigDict, prepared: datasets.PreparedData, ids: np.ndarray) -> np.ndarray:
  """Catalogue image path per document id, from the catalogue CSV ('' where unknown)."""
  from input_pipeline import catalogue as catalogue_lib  # pylint: disable=g-import-not-at-top
  try:
    columns = catalogue_lib.CatalogueColumns(**{k: (v or None) for k, v in config.data.columns.to_dict().items()})
    rows = catalogue_lib.read_catalogue(prepared.catalogue_csv, columns, eval_fraction=config.data.eval_fraction,
                                        split_seed=config.seed, max_rows=config.data.max_rows or None).rows
  except (OSError, ValueError) as e:
    logging.warning("No catalogue images for contact sheets (%s): %s", prepared.catalogue_csv, e)
    rows = []
  by_id = {row.id.encode("utf-8"): row.image_path.encode("utf-8") for row in rows}
  return np.asarray([by_id.get(i, b"") for i in ids.tolist()], dtype=bytes)


def _label_keys(labels: np.ndarray, splits: np.ndarray) -> np.ndarray:
  """Train and eval number their labels separately: (split, label) is the category."""
  return np.char.add(np.char.add(splits.astype(bytes), b":"), labels.astype(bytes))


def build(config: ml_collections.ConfigDict, workdir: str, *, catalogue: str | None = None,
          progress: bool = True) -> dict:
  """Embeds the gallery with the latest checkpoint, builds + saves ScaNN, measures it; returns index.json.

  The gallery is the run's records (train and eval documents), or every readable row of `catalogue`.
  """
  prepared = inference.run_records(config, workdir)
  trained = inference.restore_trained_model(config, workdir, records=prepared)
  step = trained.step
  root = os.path.join(workdir, INDEX_DIR)
  if catalogue:
    exports, image_paths, gallery_entries = _export_catalogue(trained, catalogue, root, progress=progress)
  else:
    exports = {}
    for what, folder, parts, head in (("document", "documents", [("train", "doc"), ("eval", "doc")], "doc"),
                                      ("query", "queries", [("eval", "query")], "query")):
      source, total = records_source(prepared.records_dir, parts, config.eval.batch_size,
                                     config.data.eval_preprocess)
      if total == 0:
        if what == "document":
          raise ValueError(f"the records in {prepared.records_dir} hold no documents (kind=doc): nothing to index")
        continue
      exports[what] = export.export_embeddings(
          os.path.join(root, folder), source, total, trained.embedder(head),
          columns=DOC_COLUMNS, shard_size=config.index.shard_size,
          fingerprint=_fingerprint(prepared, config, workdir, step, head), what=what, progress=progress)
    image_paths = None  # read from the catalogue by process 0 (_finish)
    gallery_entries = {"gallery": "every document of the records (train and eval splits)"}
  # The ScaNN index is built, measured and written once, by process 0; every process gets index.json.
  return host_gather.computed_once(_finish, config, prepared, root, step, exports, image_paths, gallery_entries,
                                   labelled=not catalogue or gallery_entries["labelled"])


def _finish(config: ml_collections.ConfigDict, prepared: datasets.PreparedData, root: str, step: int,
            exports: dict, image_paths: np.ndarray | None, gallery_entries: dict, *, labelled: bool) -> dict:
  """Process 0's part of `build`: image_paths.npy, the ScaNN searcher, its measurement, index.json."""
  docs = exports["document"]
  if image_paths is None:
    image_paths = _image_paths(config, prepared, docs.column("id"))
  np.save(os.path.join(root, "image_paths.npy"), image_paths)
  gallery = docs.vectors()
  index = scann_search.ScannIndex.build(gallery, k=10, **scann_search.params_from_config(config.index))
  index.save(os.path.join(root, "scann"))
  manifest = {"step": int(step), "num_documents": int(docs.num_rows), "dim": docs.dim, **gallery_entries,
              "searcher": index.description, "scann_params": index.params,
              **_measure(config, docs, exports.get("query"), gallery, index, labelled=labelled)}
  with open(os.path.join(root, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def _export_catalogue(trained: inference.TrainedModel, csv_path: str, root: str, *,
                      progress: bool) -> tuple[dict, np.ndarray, dict]:
  """({'document': export}, image paths, manifest entries) for every readable row of a catalogue CSV."""
  from oclear_jax.evaluators import embed_command  # pylint: disable=g-import-not-at-top
  config = trained.config
  csv_path = os.path.abspath(csv_path)
  labelled = bool(config.data.columns.label) and config.data.columns.label in embed_command.csv_header(csv_path)
  embedded = embed_command.embed_catalogue(trained, csv_path, heads=("doc",), with_label=labelled,
                                           progress=progress)
  n = len(embedded.ids)
  if n == 0:
    raise ValueError(f"catalogue {csv_path} has no row with a readable image: nothing to index "
                     f"({embedded.counts['skipped']} skipped, e.g. {embedded.skipped[:1]})")
  rows = {"id": embedded.ids, "title": embedded.titles, "label": embedded.labels, "split": ["catalogue"] * n,
          "vectors": embedded.documents}
  batch_size = config.eval.batch_size
  source = lambda start: ({k: v[s:s + batch_size] for k, v in rows.items()} for s in range(start, n, batch_size))
  stat = os.stat(csv_path)
  fingerprint = hashlib.sha256(json.dumps({
      "catalogue": csv_path, "csv_size": stat.st_size, "csv_mtime": stat.st_mtime_ns, "step": trained.step,
      "preprocess": config.data.eval_preprocess, "columns": config.data.columns.to_dict(),
      "model": config.model.to_json_best_effort()}, sort_keys=True).encode()).hexdigest()
  docs = export.export_embeddings(os.path.join(root, "documents"), source, n, lambda b: b["vectors"],
                                  columns=DOC_COLUMNS, shard_size=config.index.shard_size,
                                  fingerprint=fingerprint, what="document", progress=False)
  stale_queries = os.path.join(root, "queries")  # the run's eval photos do not belong to this gallery
  if os.path.isdir(stale_queries):
    multihost.run_on_process_zero(shutil.rmtree, stale_queries)
  described = {"gallery": f"every readable row of {csv_path}", "catalogue": csv_path, "labelled": labelled,
               "catalogue_counts": embedded.counts, "skipped": embedded.skipped}
  return {"document": docs}, np.asarray([p.encode("utf-8") for p in embedded.image_paths], dtype=bytes), described


def _measure(config, docs: export.ExportedEmbeddings, queries: export.ExportedEmbeddings | None,
             gallery: np.ndarray, index: scann_search.ScannIndex, *, labelled: bool = True) -> dict:
  """ScaNN's recall@10 against exact search, and exact-search metrics of eval photos over the catalogue
  (only with labels: a catalogue without a label column has no positives to score)."""
  limit = config.index.recall_queries
  doc_keys = _label_keys(docs.column("label"), docs.column("split"))
  ks, cutoffs = tuple(config.eval.ks), tuple(config.eval.get("cutoffs", ()))
  depth = max(ks + cutoffs + (10,))
  if queries is not None:
    q_vectors = queries.vectors()[:limit]
    q_keys = _label_keys(queries.column("label"), queries.column("split"))[:limit]
    exclude, described = None, f"{len(q_vectors)} eval-split query photos"
  else:  # a catalogue without shopper photos: documents query the others (leave-one-out)
    q_vectors, q_keys = gallery[:limit], doc_keys[:limit]
    ids = docs.column("id")
    exclude, described = (ids[:limit], ids), f"{len(q_vectors)} documents querying the others"
  _, exact = exact_search.exact_top_k_blocks(q_vectors, docs.blocks(), depth, exclude=exclude,
                                             num_blocks=docs.num_shards)
  _, approx = index.search(q_vectors, 10, exclude=exclude)
  out = {"recall_queries": described, "scann_recall_vs_exact@10": metrics_lib.recall_against_exact(
      approx, exact[:, :10])}
  if not labelled:
    return out
  ids_kw = {"query_ids": exclude[0], "gallery_ids": exclude[1]} if exclude is not None else {}
  catalogue_metrics = metrics_lib.retrieval_metrics(exact, q_keys, doc_keys, ks=ks, **ids_kw)
  if cutoffs:
    catalogue_metrics.update(product1m_metrics.product1m_metrics(exact, q_keys, doc_keys, cutoffs, **ids_kw))
  out["catalogue_metrics"] = catalogue_metrics
  return out


class GalleryIndex:
  """A built index, read back for search: the ScaNN searcher plus the documents beside it."""

  def __init__(self, workdir: str):
    self.root = os.path.join(workdir, INDEX_DIR)
    path = os.path.join(self.root, MANIFEST)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no document index in {self.root} ({MANIFEST} missing); build it first with "
                              f"python -m oclear_jax.main --mode=index --workdir={workdir}")
    with open(path, encoding="utf-8") as f:
      self.manifest = json.load(f)
    self.documents = export.ExportedEmbeddings(os.path.join(self.root, "documents"))
    self.ids = self.documents.column("id")
    self.titles = self.documents.column("title")
    self.image_paths = np.load(os.path.join(self.root, "image_paths.npy"))
    self.searcher = scann_search.ScannIndex.load(os.path.join(self.root, "scann"))
    if self.searcher.n != len(self.ids):
      raise ValueError(f"the ScaNN index in {self.root}/scann holds {self.searcher.n} vectors but the documents "
                       f"export {len(self.ids)}: rebuild it with --mode=index")

  @property
  def step(self) -> int:
    return int(self.manifest["step"])
