r"""`--mode=embed`: apply a trained run to any catalogue CSV.

  python -m oclear_jax.main --mode=embed --workdir=W --catalogue=DIR/meta.csv --output=OUT \
      [--config.data.columns.id=... --config.data.columns.title=... --config.data.columns.image=...]

Every readable row is embedded twice: as a query (its image alone, through the query head) and
as a document (image + title, through the fusion and the document head), in one tower pass.
OUT gets

  queries.npz     ids: str[n], emb: f32[n, d], L2-normalised, in the CSV's row order
  documents.npz   the same ids, document embeddings
  manifest.json   checkpoint step, the config used, counts, skipped rows with their reasons,
                  the number of empty titles, the composition served

The vectors are what `--mode=index` would serve for this catalogue: for a run with a pretrained
image tower, its parts weighed on the catalogue's own titles (`serving.composition.weigh`, no label
read; the frozen tower's pooled features where the trained parts do not earn their place); else the
run's own embeddings.

Only the columns `id`, `image` and `title` are read (named by `config.data.columns`; a title
column set to '' means no titles): labels, kinds and splits play no part, so a run trained on
N classes embeds a catalogue with other labels or none. Unreadable images (missing, empty,
truncated, not an image) and rows with an empty id or image are skipped and listed; an empty
title gives the image-only document (the fusion reads [CLS] [SEP] as "no title"). A missing
column is one ValueError naming the column and the CSV. The model comes from
`trained_run.restore_trained_model` (parameters only), inputs from `input_pipeline.images.preprocess_image_files`
and the run's tokenizer, exactly as the eval path makes them.

With N processes each reads the CSV, decodes and embeds its round-robin share of every batch of
rows (`serving/catalogue_embedding.py`), and the rows are gathered back into CSV order: the files are the same as
one process writes, and process 0 alone writes them.
"""
from __future__ import annotations

import io
import json
import sys
from typing import TextIO

import jax
import ml_collections
import numpy as np

from input_pipeline import paths
from oclear_jax import run_config
from oclear_jax import run_data
from oclear_jax.commands import evaluate
from oclear_jax.distributed import multihost
from oclear_jax.serving import catalogue_embedding
from oclear_jax.serving import composition
from oclear_jax.serving import trained_run

QUERIES_FILE = "queries.npz"
DOCUMENTS_FILE = "documents.npz"
MANIFEST = "manifest.json"


def _save_npz(path: str, ids: list[str], emb: np.ndarray) -> None:
  buffer = io.BytesIO()  # zip needs a seekable file; a bucket object is written in one piece
  np.savez(buffer, ids=np.asarray(ids, dtype=str), emb=np.ascontiguousarray(emb, np.float32))
  paths.write_bytes(path, buffer.getvalue())


def _write_output(output: str, embedded: catalogue_embedding.EmbeddedCatalogue, manifest: dict) -> None:
  paths.makedirs(output)
  _save_npz(paths.join(output, QUERIES_FILE), embedded.ids, embedded.queries)
  _save_npz(paths.join(output, DOCUMENTS_FILE), embedded.ids, embedded.documents)
  paths.write_bytes(paths.join(output, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))


def run(config: ml_collections.ConfigDict, workdir: str, catalogue: str, output: str, *, progress: bool = True,
        out: TextIO | None = None) -> dict:
  """Embeds `catalogue` with the latest checkpoint of `workdir` into `output`; returns the manifest.
  `workdir` None: the config's model at initialisation with its pretrained towers (the frozen row's)."""
  out = out or sys.stdout
  workdir, output = paths.resolve(workdir) if workdir else None, paths.resolve(output)
  csv_path = catalogue_embedding.check_catalogue(catalogue)
  # The output, the columns and the rows first: a mistake fails before the (slow) restore and embedding.
  read = catalogue_embedding.read_rows(config, csv_path)  # an empty catalogue is an error
  multihost.run_on_process_zero(paths.check_writable, output, "--output")
  trained = (trained_run.restore_trained_model(config, workdir) if workdir else evaluate.frozen_towers(
      config, run_data.title_tokenizer(config.data, [r.title for r in read.rows])))
  embedded = catalogue_embedding.embed_rows(trained, read, "views_and_towers", progress=progress)  # a collective
  if not embedded.rows:
    raise ValueError(f"catalogue {csv_path} has no row with a readable image: nothing to embed "
                     f"({embedded.counts['skipped']} skipped, e.g. {embedded.skipped[:1]})")
  chosen, evidence = composition.weigh(config.model, embedded.outputs, seed=config.seed)  # as search serves it
  embedded.outputs["query"], embedded.outputs["doc"] = composition.served_vectors(config.model, embedded.outputs,
                                                                                   chosen)
  manifest = {"workdir": workdir, "checkpoint_step": trained.step, "catalogue": csv_path,
              "dim": int(embedded.documents.shape[1]), "counts": embedded.counts,
              "num_empty_titles": embedded.counts["empty_titles"], "skipped": embedded.skipped,
              "files": {"queries": QUERIES_FILE, "documents": DOCUMENTS_FILE}, "composition": evidence,
              # The config in force: the run's config.json with each resume's changes (run_config.load).
              "config": json.loads(config.to_json_best_effort()),
              "config_history": run_config.history(workdir) if workdir else []}
  multihost.run_on_process_zero(_write_output, output, embedded, manifest)  # one writer per file
  if jax.process_index():
    return manifest
  c = embedded.counts
  print(f"embedded {c['embedded']} of {c['rows_read']} rows of {csv_path} with checkpoint step {trained.step} "
        f"({c['skipped']} skipped, {c['empty_titles']} empty titles) -> {output}/{{{QUERIES_FILE}, "
        f"{DOCUMENTS_FILE}, {MANIFEST}}}", file=out)
  return manifest
