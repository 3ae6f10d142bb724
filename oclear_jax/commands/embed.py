r"""`--mode=embed`: apply a trained run to any catalogue CSV.

  python -m oclear_jax.main --mode=embed --workdir=W --catalogue=DIR/meta.csv --output=OUT \
      [--config.data.columns.id=... --config.data.columns.title=... --config.data.columns.image=...]

Every readable row is embedded twice: as a query (its image alone, through the query head) and
as a document (image + title, through the fusion and the document head), in one tower pass.
OUT gets

  queries.npz     ids: str[n], emb: f32[n, d], L2-normalised, in the CSV's row order
  documents.npz   the same ids, document embeddings
  manifest.json   checkpoint step, the config used, counts, skipped rows with their reasons,
                  the number of empty titles

Only the columns `id`, `image` and `title` are read (named by `config.data.columns`; a title
column set to '' means no titles): labels, kinds and splits play no part, so a run trained on
N classes embeds a catalogue with other labels or none. Unreadable images (missing, empty,
truncated, not an image) and rows with an empty id or image are skipped and listed; an empty
title gives the image-only document (the fusion reads [CLS] [SEP] as "no title"). A missing
column is one ValueError naming the column and the CSV. The model comes from
`trained_run.restore_trained_model` (parameters only), inputs from `trained_run.preprocess_image_files`
and the run's tokenizer, exactly as the eval path makes them.

With N processes each reads the CSV, decodes and embeds its round-robin share of every batch of
rows (`host_gather`), and the rows are gathered back into CSV order: the files are the same as
one process writes, and process 0 alone writes them.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from typing import TextIO

import jax
import ml_collections
import numpy as np
import tqdm

from input_pipeline import catalogue as catalogue_lib
from oclear_jax.serving import trained_run
from oclear_jax.distributed import multihost
from input_pipeline import paths
from oclear_jax.distributed import host_gather
from oclear_jax.models import ModelConfig

QUERIES_FILE = "queries.npz"
DOCUMENTS_FILE = "documents.npz"
MANIFEST = "manifest.json"


@dataclasses.dataclass
class EmbeddedCatalogue:
  """The embedded rows of a catalogue, in CSV order, and what was skipped."""
  ids: list[str]
  titles: list[str]
  labels: list[str]  # '' everywhere without a label column
  image_paths: list[str]
  queries: np.ndarray | None  # f32[n, d]; None when not asked for
  documents: np.ndarray | None
  skipped: list[dict]  # {"id", "image", "reason"[, "detail"]}; "line" too for rows with an empty id or image
  counts: dict[str, int]


def catalogue_columns(config: ml_collections.ConfigDict, *, with_label: bool = False) -> catalogue_lib.CatalogueColumns:
  """The CSV columns to read: id, image, title (None if ''), and the label only when asked for."""
  names = config.data.columns
  return catalogue_lib.CatalogueColumns(id=names.id, image=names.image, title=names.title or None,
                                        label=(names.label or None) if with_label else None)


def csv_header(csv_path: str) -> list[str]:
  """The column names of a CSV (as `catalogue.read_catalogue` reads them)."""
  with catalogue_lib.open_text(_check_catalogue(csv_path)) as f:
    return next(csv.reader(f), [])


def _check_catalogue(csv_path: str) -> str:
  if not paths.exists(csv_path) or paths.isdir(csv_path):
    raise FileNotFoundError(f"catalogue {csv_path} not found; pass --catalogue=DIR/meta.csv (a CSV whose image "
                            f"paths are relative to its folder)")
  return paths.resolve(csv_path)  # gs://bucket/cat.csv stays a URL


def embed_catalogue(trained: trained_run.TrainedModel, csv_path: str, *, heads: tuple[str, ...] = ("query", "doc"),
                    with_label: bool = False, progress: bool = True) -> EmbeddedCatalogue:
  """Embeds every readable row of `csv_path` through `heads` ('query', 'doc' or both) in batches."""
  config = trained.config
  csv_path = _check_catalogue(csv_path)
  read = catalogue_lib.read_catalogue(csv_path, catalogue_columns(config, with_label=with_label),
                                      split_seed=config.seed)
  head = "query_and_doc" if set(heads) == {"query", "doc"} else heads[0]
  embedder = trained.mesh_embedder(head)
  batch_size = config.eval.batch_size
  local = {"row": [], "vectors": [], "failed": []}  # this process's share: CSV positions, vectors, failures
  for start in tqdm.tqdm(range(0, len(read.rows), batch_size), desc="embed catalogue", unit="batch",
                         disable=not progress or jax.process_index() != 0):
    positions = start + host_gather.share_rows(len(read.rows[start:start + batch_size]))
    rows = [read.rows[i] for i in positions]
    images, kept, failed = trained_run.preprocess_image_files([r.image_path for r in rows], config, first_index=start)
    for position, reason in failed:
      row = rows[position]
      local["failed"].append((int(positions[position]), {"id": row.id, "image": row.image_path,
                                                         "reason": reason.split(":")[0], "detail": reason}))
    batch = {"image": images, "title_tokens": trained.tokenize([rows[i].title for i in kept])} if kept else None
    out = embedder.step(batch)  # every process, every chunk: a collective
    if kept:
      local["row"].append(positions[kept])
      local["vectors"].append(np.asarray(out[head], np.float32))
  width = ModelConfig.from_config(config.model).output_dim
  kept_rows, stacked, failed = _gathered(local, read.rows, (2, width) if head == "query_and_doc" else (width,))
  skipped = list(read.skipped) + failed
  if head == "query_and_doc":
    queries, documents = stacked[:, 0], stacked[:, 1]
  else:
    queries, documents = (stacked, None) if head == "query" else (None, stacked)
  counts = {"rows_read": read.counts["rows_read"], "embedded": len(kept_rows), "skipped": len(skipped),
            "empty_titles": sum(not r.title for r in kept_rows)}
  return EmbeddedCatalogue(
      ids=[r.id for r in kept_rows], titles=[r.title for r in kept_rows], labels=[r.label for r in kept_rows],
      image_paths=[r.image_path for r in kept_rows], queries=queries, documents=documents,
      skipped=skipped, counts=counts)


def _gathered(local: dict, rows: list, shape: tuple[int, ...]) -> tuple[list, np.ndarray, list[dict]]:
  """(embedded rows, f32[n, *shape] vectors, failures) of every process, in CSV order."""
  mine = {"row": np.concatenate(local["row"]) if local["row"] else np.zeros(0, np.int64),
          "vectors": np.concatenate(local["vectors"]) if local["vectors"] else np.zeros((0, *shape), np.float32)}
  every = host_gather.gather_rows(mine)
  order = np.argsort(every["row"], kind="stable")
  failed = sorted((f for part in multihost.gather_objects(local["failed"]) for f in part), key=lambda f: f[0])
  return [rows[i] for i in every["row"][order]], every["vectors"][order], [f for _, f in failed]


def _save_npz(path: str, ids: list[str], emb: np.ndarray) -> None:
  buffer = io.BytesIO()  # zip needs a seekable file; a bucket object is written in one piece
  np.savez(buffer, ids=np.asarray(ids, dtype=str), emb=np.ascontiguousarray(emb, np.float32))
  paths.write_bytes(path, buffer.getvalue())


def _write_output(output: str, embedded: EmbeddedCatalogue, manifest: dict) -> None:
  paths.makedirs(output)
  _save_npz(paths.join(output, QUERIES_FILE), embedded.ids, embedded.queries)
  _save_npz(paths.join(output, DOCUMENTS_FILE), embedded.ids, embedded.documents)
  paths.write_bytes(paths.join(output, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))


def run(config: ml_collections.ConfigDict, workdir: str, catalogue: str, output: str, *, progress: bool = True,
        out: TextIO | None = None) -> dict:
  """Embeds `catalogue` with the latest checkpoint of `workdir` into `output`; returns the manifest."""
  out = out or sys.stdout
  workdir, output = paths.resolve(workdir), paths.resolve(output)
  csv_path = _check_catalogue(catalogue)
  # Columns first: a misnamed column fails before the (slow) restore.
  catalogue_lib.read_catalogue(csv_path, catalogue_columns(config), max_rows=0)
  trained = trained_run.restore_trained_model(config, workdir)
  embedded = embed_catalogue(trained, csv_path, progress=progress)  # every process: a collective
  manifest = {"workdir": workdir, "checkpoint_step": trained.step, "catalogue": csv_path,
              "dim": int(embedded.documents.shape[1]), "counts": embedded.counts,
              "num_empty_titles": embedded.counts["empty_titles"], "skipped": embedded.skipped,
              "files": {"queries": QUERIES_FILE, "documents": DOCUMENTS_FILE},
              "config": json.loads(config.to_json_best_effort())}
  multihost.run_on_process_zero(_write_output, output, embedded, manifest)  # one writer per file
  if jax.process_index():
    return manifest
  c = embedded.counts
  print(f"embedded {c['embedded']} of {c['rows_read']} rows of {csv_path} with checkpoint step {trained.step} "
        f"({c['skipped']} skipped, {c['empty_titles']} empty titles) -> {output}/{{{QUERIES_FILE}, "
        f"{DOCUMENTS_FILE}, {MANIFEST}}}", file=out)
  return manifest
