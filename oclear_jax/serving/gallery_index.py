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
  scann/           the serialized ScaNN searcher, its chosen search depth in the sidecar
  frontier.json    every searcher setting the tuner tried (recall@10 against exact, q/s) and
  frontier.png     the chosen one (`index_tuning`); one row when the gallery is searched exactly
  index.json       written last (its presence means "complete"): checkpoint step,
                   counts, ScaNN settings, the chosen setting with its recall and q/s, metrics

The searcher meets `config.index.target_recall` (recall@10 against exact search, default 0.95) on
held-out queries: the eval split's query photos where the run has them, else documents sampled
from the gallery that search it with themselves excluded. Excluding rather than holding those
documents out of the gallery is deliberate: every document must be in the index a shopper
searches, and ScaNN builds are not bit-reproducible, so the index measured must be the index
shipped. A gallery of at most `config.index.exact_max_documents` is searched exactly.

Both exports of the run's records resume shard by shard (`export`), so an interrupted index
build restarts where it stopped; their fingerprint covers the records, the checkpoint and the
preprocessing, so a newer checkpoint re-embeds. With N processes every process reads the
gallery and embeds its share of each batch (`export`, `host_gather`); process 0 alone writes the
files and builds the ScaNN index, once, which `search` loads. Queries and documents must come
from the same checkpoint, so `GalleryIndex.step` tells `search` which checkpoint to embed
queries with.

What the index serves is the run weighed on this gallery (`serving.composition`): for a run with a
pretrained image tower, `composition.choose` picks, on up to 2,000 of its documents (the held-out
split's where the records have one) and without labels, how much of the trained image part and of
the title parts the gallery's own titles vouch for; documents are embedded so, `index.json` records
the choice and its evidence, and `search` embeds queries the same way. With title feedback on
(`eval.title_feedback_docs`), the documents' title vectors (`title_vectors.npy`, f16, centred by the
gallery's mean) are kept for `GalleryIndex.search` to re-rank with.

The workdir may be a URL (gs://bucket/run): every file above goes through `input_pipeline.paths`
(the ScaNN folder is serialized locally and copied up, and copied down to load), and the
checkpoint is looked up where orbax keeps it (`checkpoint.orbax_directory`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import paths
from input_pipeline import pipeline
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import run_data
from oclear_jax.distributed import host_gather
from oclear_jax.distributed import multihost
from oclear_jax.retrieval import exact_search
from oclear_jax.retrieval import index_tuning
from oclear_jax.retrieval import metrics as metrics_lib
from oclear_jax.retrieval import product1m_metrics
from oclear_jax.retrieval import scann_search
from oclear_jax.retrieval import title_feedback
from oclear_jax.serving import catalogue_embedding
from oclear_jax.serving import composition as composition_lib
from oclear_jax.serving import export
from oclear_jax.serving import trained_run

INDEX_DIR = "index"
MANIFEST = "index.json"
TITLE_VECTORS = "title_vectors.npy"
DOC_COLUMNS = ("id", "title", "label", "split")


def records_source(records_dir: str, parts: list[tuple[str, str]], batch_size: int,
                   preprocess: str) -> tuple[Callable[[int], Iterator[dict]], int]:
  """(`source(start_row)`, total) over the (split, kind) parts of the records, in that order."""
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


def _fingerprint(prepared: run_data.PreparedData, config: ml_collections.ConfigDict, workdir: str, step: int,
                 head: str) -> str:
  ckpt = checkpoint_folder(workdir, step)
  # A folder's mtime locally; object stores have no folders, so there the step's metadata file's.
  stat = paths.size_and_mtime(ckpt) or paths.size_and_mtime(paths.join(ckpt, "_CHECKPOINT_METADATA"))
  stamp = stat[1] if stat else 0
  blob = json.dumps({"records": prepared.summary.get("fingerprint"), "step": step, "checkpoint_mtime": stamp,
                     "preprocess": config.data.eval_preprocess, "model": config.model.to_json_best_effort(),
                     "head": head}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_folder(workdir: str, step: int) -> str:
  """Where orbax keeps the run's checkpoint `step` (a URL for a gs:// workdir)."""
  return paths.join(checkpoint_lib.orbax_directory(paths.join(workdir, "checkpoints")), str(step))


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def _image_paths(config: ml_collections.ConfigDict, prepared: run_data.PreparedData, ids: np.ndarray) -> np.ndarray:
  """Catalogue image path per document id, from the catalogue CSV ('' where unknown)."""
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
  prepared = trained_run.run_records(config, workdir)
  trained = trained_run.restore_trained_model(config, workdir, records=prepared)
  step = trained.step
  root = paths.join(workdir, INDEX_DIR)
  if catalogue:
    exports, image_paths, gallery_entries = _export_catalogue(trained, catalogue, root, progress=progress)
  else:
    evidence = _weigh_on_records(trained, prepared)
    exports = {}
    documents, feedback = [("train", "doc"), ("eval", "doc")], title_feedback.configured(config)
    for what, folder, parts, head in (("document", "documents", documents, "doc"),
                                      ("query", "queries", [("eval", "query")], "query"),
                                      ("title", "titles", documents if feedback else [], "title")):
      source, total = records_source(prepared.records_dir, parts, config.eval.batch_size,
                                     config.data.eval_preprocess)
      if total == 0:
        if what == "title":
          continue
        if what == "document":
          raise ValueError(f"the records in {prepared.records_dir} hold no documents (kind=doc): nothing to index")
        continue
      exports[what] = export.export_embeddings(
          paths.join(root, folder), source, total, trained.embedder(head),
          columns=DOC_COLUMNS, shard_size=config.index.shard_size,
          fingerprint=_fingerprint(prepared, config, workdir, step, f"{head}|{trained.composition}"), what=what,
          progress=progress)
    image_paths = None  # read from the catalogue by process 0 (_finish)
    gallery_entries = {"gallery": "every document of the records (train and eval splits)", "composition": evidence}
  # The ScaNN index is built, measured and written once, by process 0; every process gets index.json.
  return host_gather.computed_once(_finish, config, prepared, root, step, exports, image_paths, gallery_entries,
                                   labelled=not catalogue or gallery_entries["labelled"])


def _finish(config: ml_collections.ConfigDict, prepared: run_data.PreparedData, root: str, step: int,
            exports: dict, image_paths: np.ndarray | None, gallery_entries: dict, *, labelled: bool) -> dict:
  """Process 0's part of `build`: image_paths.npy, the tuned searcher, its frontier and metrics, index.json."""
  docs = exports["document"]
  if image_paths is None:
    image_paths = _image_paths(config, prepared, docs.column("id"))
  paths.write_bytes(paths.join(root, "image_paths.npy"), _npy_bytes(image_paths))
  gallery = docs.vectors()
  held_out = _held_out_queries(config, docs, exports.get("query"), gallery)
  ks, cutoffs = tuple(config.eval.ks), tuple(config.eval.cutoffs)
  _, exact = exact_search.fastest_exact_top_k(held_out["vectors"], gallery, max(ks + cutoffs + (10,)),
                                              exclude=held_out["exclude"])
  tuned = _searcher(config, gallery, held_out, exact[:, :10])
  feedback = {}
  if "title" in exports:  # the documents' title vectors, centred by the gallery's mean: what search re-ranks with
    vectors = title_feedback.gallery_title_vectors(exports["title"].vectors(), np.ones(docs.num_rows, bool))
    paths.write_bytes(paths.join(root, TITLE_VECTORS), _npy_bytes(vectors.astype(np.float16)))
    feedback = {"title_vectors": TITLE_VECTORS, "title_dim": int(vectors.shape[1])}
  tuned.index.save(paths.join(root, "scann"))
  index_tuning.write_frontier(tuned, root)
  manifest = {"step": int(step), "num_documents": int(docs.num_rows), "dim": docs.dim, **gallery_entries,
              "searcher": tuned.index.description, "scann_params": tuned.index.params,
              "recall_queries": held_out["described"], "scann_recall_vs_exact@10": tuned.chosen["recall@10"],
              "chosen": tuned.chosen, "frontier": "frontier.json", **feedback}
  if labelled:
    manifest["catalogue_metrics"] = _catalogue_metrics(config, docs, held_out, exact)
  paths.write_bytes(paths.join(root, MANIFEST), json.dumps(manifest, indent=2).encode("utf-8"))
  return manifest


def _searcher(config, gallery: np.ndarray, held_out: dict, exact: np.ndarray) -> index_tuning.Tuned:
  """The gallery's searcher: exact when small, else tuned to config.index.target_recall (unless 0)."""
  cfg, n = config.index, len(gallery)
  params = scann_search.params_from_config(cfg)
  target = cfg.target_recall
  if n <= cfg.exact_max_documents or n < cfg.min_points_for_tree:
    index = scann_search.ScannIndex.build(gallery, k=10, brute_force=True)
    why = (f"exact: a gallery of {n} documents (at most config.index.exact_max_documents="
           f"{cfg.exact_max_documents}, or too few to train a tree)")
    return index_tuning.single_setting(index, held_out["vectors"], exact, target_recall=target,
                                       exclude=held_out["exclude"], why=why)
  if not target:
    index = scann_search.ScannIndex.build(gallery, k=10, **{**params, "exact_max_documents": 0})
    return index_tuning.single_setting(index, held_out["vectors"], exact, exclude=held_out["exclude"],
                                       why="not tuned (config.index.target_recall=0): the configured knobs")
  return index_tuning.tune(gallery, held_out["vectors"], k=10, target_recall=target,
                           build_budget_s=cfg.tuning_budget_s, base=params, exclude=held_out["exclude"],
                           ground_truth=exact)


def _held_out_queries(config, docs: export.ExportedEmbeddings, queries: export.ExportedEmbeddings | None,
                      gallery: np.ndarray) -> dict:
  """Up to config.index.recall_queries held-out queries: eval query photos, else documents searching the others.

  A fixed random sample (seed 0), not the first rows, which may all come from one split or category.
  """
  limit = config.index.recall_queries
  doc_keys = _label_keys(docs.column("label"), docs.column("split"))
  rng = np.random.default_rng(0)
  if queries is not None and queries.num_rows:
    rows = np.sort(rng.choice(queries.num_rows, min(limit, queries.num_rows), replace=False))
    keys = _label_keys(queries.column("label"), queries.column("split"))[rows]
    return {"vectors": queries.vectors()[rows], "keys": keys, "exclude": None, "doc_keys": doc_keys,
            "described": f"{len(rows)} eval-split query photos"}
  rows = np.sort(rng.choice(len(gallery), min(limit, len(gallery)), replace=False))
  ids = docs.column("id")
  return {"vectors": gallery[rows], "keys": doc_keys[rows], "exclude": (ids[rows], ids), "doc_keys": doc_keys,
          "described": f"{len(rows)} documents querying the others (themselves excluded)"}


def _weigh(trained: trained_run.TrainedModel, outputs: dict[str, np.ndarray]) -> dict | None:
  """Sets `trained.composition` to what `composition.weigh` picks on these documents' outputs; its evidence."""
  trained.composition, evidence = composition_lib.weigh(trained.config.model, outputs, seed=trained.config.seed)
  return evidence


def _weigh_on_records(trained: trained_run.TrainedModel, prepared: run_data.PreparedData,
                      max_rows: int = 2000) -> dict | None:
  """`_weigh` on up to `max_rows` documents of the held-out (eval) split, else of the training split."""
  if not trained.config.model.image_pretrained:
    return None
  config = trained.config
  for parts in ([("eval", "doc")], [("train", "doc")]):
    source, total = records_source(prepared.records_dir, parts, config.eval.batch_size, config.data.eval_preprocess)
    if total:
      break
  embedder, chunks, n = trained.mesh_embedder("views_and_towers"), [], 0
  for batch in source(0):  # every process reads the same batches: a collective per batch
    chunks.append(embedder.batch({k: batch[k] for k in ("image", "title_tokens")}))
    n += len(batch["id"])
    if n >= max_rows:
      break
  return _weigh(trained, {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})


def _export_catalogue(trained: trained_run.TrainedModel, csv_path: str, root: str, *,
                      progress: bool) -> tuple[dict, np.ndarray, dict]:
  """({'document': export[, 'title': export]}, image paths, manifest entries) for every readable row of a CSV."""
  config = trained.config
  csv_path = paths.resolve(csv_path)
  labelled = bool(config.data.columns.label) and config.data.columns.label in catalogue_embedding.csv_header(csv_path)
  read = catalogue_embedding.read_rows(config, csv_path,
                                       columns=catalogue_embedding.catalogue_columns(config, with_label=labelled))
  embedded = catalogue_embedding.embed_rows(trained, read, "views_and_towers", progress=progress)
  evidence = _weigh(trained, embedded.outputs)
  embedded.outputs["doc"] = composition_lib.served_vectors(config.model, embedded.outputs, trained.composition)[1]
  n = len(embedded.ids)
  if n == 0:
    raise ValueError(f"catalogue {csv_path} has no row with a readable image: nothing to index "
                     f"({embedded.counts['skipped']} skipped, e.g. {embedded.skipped[:1]})")
  rows = {"id": embedded.ids, "title": embedded.titles, "label": embedded.labels, "split": ["catalogue"] * n,
          "vectors": embedded.documents, "title_vectors": embedded.outputs.get("title")}
  batch_size = config.eval.batch_size
  source = lambda start: ({k: v[s:s + batch_size] for k, v in rows.items() if v is not None}
                          for s in range(start, n, batch_size))
  size, mtime = paths.size_and_mtime(csv_path) or (0, 0)
  fingerprint = hashlib.sha256(json.dumps({
      "catalogue": csv_path, "csv_size": size, "csv_mtime": mtime, "step": trained.step,
      "preprocess": config.data.eval_preprocess, "columns": config.data.columns.to_dict(),
      "model": config.model.to_json_best_effort(), "composition": str(trained.composition)},
      sort_keys=True).encode()).hexdigest()
  exports = {}
  for what, folder, key in (("document", "documents", "vectors"), ("title", "titles", "title_vectors")):
    if rows[key] is not None and (what == "document" or title_feedback.configured(config)):
      exports[what] = export.export_embeddings(
          paths.join(root, folder), source, n, lambda b, key=key: b[key], columns=DOC_COLUMNS,
          shard_size=config.index.shard_size, fingerprint=f"{fingerprint}/{key}", what=what, progress=False)
  stale_queries = paths.join(root, "queries")  # the run's eval photos do not belong to this gallery
  if paths.isdir(stale_queries):
    multihost.run_on_process_zero(paths.rmtree, stale_queries)
  described = {"gallery": f"every readable row of {csv_path}", "catalogue": csv_path, "labelled": labelled,
               "composition": evidence,
               "catalogue_counts": embedded.counts, "skipped": embedded.skipped}
  return exports, np.asarray([p.encode("utf-8") for p in embedded.image_paths], dtype=bytes), described


def _catalogue_metrics(config, docs: export.ExportedEmbeddings, held_out: dict, exact: np.ndarray) -> dict:
  """Exact-search metrics of the held-out queries over the whole catalogue (labelled galleries only)."""
  ks, cutoffs = tuple(config.eval.ks), tuple(config.eval.cutoffs)
  exclude = held_out["exclude"]
  ids_kw = {"query_ids": exclude[0], "gallery_ids": exclude[1]} if exclude is not None else {}
  out = metrics_lib.retrieval_metrics(exact, held_out["keys"], held_out["doc_keys"], ks=ks, **ids_kw)
  if cutoffs:
    out.update(product1m_metrics.product1m_metrics(exact, held_out["keys"], held_out["doc_keys"], cutoffs, **ids_kw))
  return out


class GalleryIndex:
  """A built index, read back for search: the ScaNN searcher plus the documents beside it."""

  def __init__(self, workdir: str):
    self.root = paths.join(workdir, INDEX_DIR)
    path = paths.join(self.root, MANIFEST)
    if not paths.exists(path):
      raise FileNotFoundError(f"no document index in {self.root} ({MANIFEST} missing); build it first with "
                              f"python -m oclear_jax.main --mode=index --workdir={workdir}")
    self.manifest = json.loads(paths.read_bytes(path))
    self.documents = export.ExportedEmbeddings(paths.join(self.root, "documents"))
    self.ids = self.documents.column("id")
    self.titles = self.documents.column("title")
    self.image_paths = np.load(io.BytesIO(paths.read_bytes(paths.join(self.root, "image_paths.npy"))))
    self.searcher = scann_search.ScannIndex.load(paths.join(self.root, "scann"))
    if self.searcher.n != len(self.ids):
      raise ValueError(f"the ScaNN index in {self.root}/scann holds {self.searcher.n} vectors but the documents "
                       f"export {len(self.ids)}: rebuild it with --mode=index")
    # f32[N, T] unit title vectors of the documents (zero rows: untitled), where the index was built with them.
    name = self.manifest.get("title_vectors")
    self.title_vectors = (np.load(io.BytesIO(paths.read_bytes(paths.join(self.root, name)))).astype(np.float32)
                          if name else None)

  def search(self, queries: np.ndarray, top_k: int, config: ml_collections.ConfigDict, *,
             searcher: scann_search.ScannIndex | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(scores f32[Q, top_k], document rows int[Q, top_k] (-1: none), re-ranked?) of query vectors.

    With title vectors in the index and title feedback on in `config` (eval.title_feedback_docs and
    _weight, as the eval measured it), the searcher's top max(top_k, eval depth) candidates are re-ranked
    by the titles of their top results (`title_feedback.rerank`) before the first `top_k` are kept.
    """
    searcher = searcher or self.searcher
    if self.title_vectors is None or not title_feedback.configured(config):
      return (*searcher.search(queries, top_k), False)
    depth = max(top_k, *config.eval.ks, *config.eval.cutoffs)
    scores, rows = searcher.search(queries, min(depth, len(self.ids)))
    scores, rows = title_feedback.rerank(np.asarray(scores), np.asarray(rows), self.title_vectors,
                                         feedback_docs=config.eval.title_feedback_docs,
                                         weight=config.eval.title_feedback_weight)
    return scores[:, :top_k], rows[:, :top_k], True

  @property
  def step(self) -> int:
    return int(self.manifest["step"])
