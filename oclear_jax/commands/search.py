r"""`--mode=index` and `--mode=search`: the trained model as a product search engine.

  python -m oclear_jax.main --mode=index --workdir=workdirs/demo [--catalogue=DIR/meta.csv]
  python -m oclear_jax.main --mode=index --workdir=workdirs/demo --config.index.target_recall=0.9
  python -m oclear_jax.main --mode=search --workdir=workdirs/demo --query=photo.jpg [--query=...] \
      [--top_k=10] [--output_format=json] [--search.leaves=N] [--search.reorder=M]
  python -m oclear_jax.main --mode=search --workdir=workdirs/demo --query=queries.csv --output=results.jsonl

`index` embeds every document of the run's catalogue (train and eval splits: a shopper
searches the whole catalogue) with the latest checkpoint and writes `{workdir}/index/`
(see `gallery_index`): resumable embedding shards with ids and titles, the serialized ScaNN
searcher tuned to `config.index.target_recall` on held-out queries (`index_tuning`; galleries of at
most `config.index.exact_max_documents` are searched exactly), `frontier.json`/`frontier.png` with
every setting tried, and `index.json` with the chosen setting, its recall against exact search and
its queries/s. `--config.x=v` overrides apply to the run's saved config (see `main`). With `--catalogue=CSV` the
gallery is every readable row of that catalogue instead (any catalogue, columns named by
`config.data.columns`; see `gallery_index`).

`search` never builds the index itself (embedding a large catalogue can take hours, which a
search command should not start silently): without `{workdir}/index/index.json` it stops and
says to run `--mode=index`. Query files are turned into model inputs exactly as eval queries
are: re-encoded like the records (`input_pipeline.records.encode_image`: RGB, shrunk to
`data.stored_image_size`, JPEG) and then `config.data.eval_preprocess`. Queries are embedded
with the checkpoint the index was built from (never a newer one: the two heads must match).
Where the index holds its documents' title vectors (built with `eval.title_feedback_docs` > 0 and a
text tower), the searcher's top candidates are re-ranked by the titles of each query's top results
exactly as the eval's prf/ rows measured (`gallery_index.GalleryIndex.search`;
`--config.eval.title_feedback_docs=0` turns it off). A `--query` CSV stands for the images of its rows
(unreadable ones skipped and listed); `--output=FILE.jsonl` writes one line of results per query.
It prints the top-K documents per query (rank, id, title, score) as a table or as JSON on
stdout, and writes a contact sheet to `{workdir}/search/contact_sheet.png` (queries framed
blue, results grey: a user's search has no ground truth). The index's tuned search depth is used
unless `--search.leaves` (tree leaves probed) or `--search.reorder` (candidates re-scored exactly)
deepen or shorten this one search; an exact (brute-force) index ignores them.

Both run on the mesh of `config.mesh` over every process's devices (one process, or N launched
as for training: each embeds its share, process 0 alone builds the ScaNN index, writes the files,
searches the loaded index and prints), with the model's parameters only (`oclear_jax.serving.trained_run`:
no class centres, no optimizer state). Both read the config the training run saved
(`{workdir}/config.json`) unless one is passed. Problems a user can fix (missing files, a file
that is not an image, no checkpoint, no index) raise ValueError / FileNotFoundError naming the
file; `main` prints them as one `error: ...` line with exit code 2.

The workdir may be a URL (gs://bucket/run): the index is read from and the contact sheet written to
it through `input_pipeline.paths`, and query images may be URLs too.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from typing import Any, TextIO

import jax
import ml_collections
import numpy as np
from PIL import Image

from input_pipeline import images as images_lib
from oclear_jax.serving import catalogue_embedding
from oclear_jax.serving import composition as composition_lib
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import run_config
from oclear_jax.serving import trained_run
from input_pipeline import paths
from oclear_jax.distributed import multihost
from oclear_jax.serving import gallery_index
from oclear_jax.distributed import host_gather
from oclear_jax.retrieval import plots

CONTACT_SHEET = os.path.join("search", "contact_sheet.png")
MAX_SHEET_QUERIES = 16  # a batch of queries (a CSV) draws its first ones


def build_index(workdir: str, config: ml_collections.ConfigDict | None = None, *, catalogue: str | None = None,
                progress: bool = True, out: TextIO | None = None) -> dict:
  """Builds `{workdir}/index/` (of the run's records, or of `catalogue`) and prints what was built;
  returns the index manifest."""
  out = out or sys.stdout
  workdir = paths.resolve(workdir)  # gs://bucket/run stays a URL
  config = config if config is not None else run_config.load(workdir)
  manifest = gallery_index.build(config, workdir, catalogue=catalogue, progress=progress)  # every process
  if jax.process_index() == 0:
    _print_built(manifest, workdir, out)
  return manifest


def _print_built(manifest: dict, workdir: str, out: TextIO) -> None:
  print(f"index: {manifest['num_documents']} documents ({manifest['gallery']}) embedded with checkpoint step "
        f"{manifest['step']} -> {paths.join(workdir, gallery_index.INDEX_DIR)}", file=out)
  if manifest.get("skipped"):
    print(f"skipped {len(manifest['skipped'])} rows (listed in index.json), e.g. {manifest['skipped'][0]}", file=out)
  print(f"searcher: {manifest['searcher']}", file=out)
  chosen = manifest.get("chosen") or {}
  speed = f" at {chosen['queries/s']:,.0f} queries/s" if chosen.get("queries/s") else ""
  if chosen.get("speedup_vs_exact"):
    speed += f" ({chosen['speedup_vs_exact']:.1f}x exact search)"
  print(f"ScaNN recall@10 against exact search: {manifest['scann_recall_vs_exact@10']:.3f}{speed} "
        f"({manifest['recall_queries']}); every setting tried: "
        f"{paths.join(workdir, gallery_index.INDEX_DIR, 'frontier.png')}", file=out)
  if chosen and not chosen.get("met", True):
    print(f"warning: {chosen['why']}", file=out)
  m = manifest.get("catalogue_metrics")
  if m:
    shown = [k for k in ("recall@1", "recall@10", "map@10", "prec@10", "mar@10") if k in m]
    print("exact search over the whole catalogue: " + ", ".join(f"{k} {m[k]:.3f}" for k in shown), file=out)
  else:
    print("no retrieval metrics: the catalogue has no label column (config.data.columns.label)", file=out)


def expand_queries(queries: list[str], config: ml_collections.ConfigDict) -> tuple[list[str], list[dict]]:
  """(query image files, skipped rows): image files as given; a `.csv` stands for the images of its rows
  (column config.data.columns.image, relative to the CSV's folder; rows whose image is unreadable are skipped
  with their reason, the rest searched)."""
  files, skipped = [], []
  for query in queries:
    if not query.lower().endswith(".csv"):
      files.append(query)
      continue
    columns = catalogue_embedding.catalogue_columns(config)
    read = catalogue_embedding.read_rows(config, query, columns=dataclasses.replace(columns, title=None))
    paths_in_csv = [row.image_path for row in read.rows]
    _, kept, failed = images_lib.preprocess_image_files(paths_in_csv, config.data)
    files += [paths_in_csv[i] for i in kept]
    skipped += list(read.skipped) + [{"image": paths_in_csv[i], "reason": reason} for i, reason in failed]
  return files, skipped


def load_query_images(files: list[str], config: ml_collections.ConfigDict) -> tuple[np.ndarray, list[np.ndarray]]:
  """(model inputs f32[Q, H, W, 3] exactly like eval queries, display images uint8) for image files
  (local paths or URLs)."""
  for path in files:
    if not paths.exists(path) or paths.isdir(path):
      raise FileNotFoundError(f"query image {path} not found")
  inputs, _, failed = images_lib.preprocess_image_files(files, config.data)
  if failed:
    i, reason = failed[0]
    raise ValueError(f"query {files[i]} is not a usable image ({reason}); pass a photo (JPEG, PNG, WebP, ...)")
  shown = []
  for path in files:
    with _open_image(path) as image:
      shown.append(_display(image))
  return inputs, shown


def _open_image(path: str) -> Image.Image:
  """A local image file opened by name, a URL's (gs://bucket/images/...) from its bytes."""
  return Image.open(io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path)


def _display(image: Image.Image, size: int = 256) -> np.ndarray:
  """RGB uint8 for a contact-sheet tile: large photos shrunk, tiny ones (thumbnails) enlarged."""
  image = image.convert("RGB")
  scale = size / max(image.size)
  image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                       Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
  return np.asarray(image)


def _text(value) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _document_image(path: bytes) -> np.ndarray:
  try:
    with _open_image(_text(path)) as image:
      return _display(image)
  # Moved or deleted since indexing (OSError; tf.errors for URLs): a blank tile, not a failed search.
  except Exception:  # pylint: disable=broad-except
    return np.full((64, 64, 3), 230, np.uint8)


def _embed_queries(config, workdir: str, index: gallery_index.GalleryIndex, images: np.ndarray) -> np.ndarray:
  ckpt = gallery_index.checkpoint_folder(workdir, index.step)
  if not paths.isdir(ckpt):
    raise FileNotFoundError(f"the index in {index.root} was built with checkpoint step {index.step}, which is no "
                            f"longer in {os.path.dirname(ckpt)}; rebuild it: --mode=index --workdir={workdir}")
  trained = trained_run.restore_trained_model(config, workdir, index.step)
  trained.composition = composition_lib.from_manifest(index.manifest.get("composition"))  # as the documents were
  embed = trained.embedder("query")
  batch_size = config.eval.batch_size
  return np.concatenate([embed({"image": images[s:s + batch_size]}) for s in range(0, len(images), batch_size)])


def _latest_step(workdir: str) -> int | None:
  ckpt_dir = checkpoint_lib.orbax_directory(paths.join(workdir, "checkpoints"))
  steps = [int(n) for n in paths.listdir(ckpt_dir) if n.isdigit()] if paths.isdir(ckpt_dir) else []
  return max(steps, default=None)


def search(workdir: str, queries: list[str], *, top_k: int = 10, output_format: str = "table",
           config: ml_collections.ConfigDict | None = None, out: TextIO | None = None,
           leaves_to_search: int | None = None, reorder: int | None = None,
           output: str | None = None) -> dict[str, Any]:
  """Prints the top-K documents of each query image; returns the results as a dict (the JSON output).

  `queries`: image files, or CSVs of query images (`expand_queries`). `leaves_to_search` / `reorder`
  override the index's tuned search depth for this search (None: keep it). `output` (FILE.jsonl): one
  JSON line per query written there, and only a summary printed.
  """
  out = out or sys.stdout
  if top_k < 1:
    raise ValueError(f"--top_k={top_k}: ask for at least 1 result")
  for flag, value in (("--search.leaves", leaves_to_search), ("--search.reorder", reorder)):
    if value is not None and value < 1:
      raise ValueError(f"{flag}={value}: use a positive number (or leave it out for the index's tuned depth)")
  if output_format not in ("table", "json"):
    raise ValueError(f"--output_format={output_format!r}: use 'table' or 'json'")
  if not queries:
    raise ValueError("no query images: pass --query=IMAGE (repeat it for several)")
  if output and not output.endswith(".jsonl"):
    raise ValueError(f"--output={output}: search writes JSON lines; name a FILE.jsonl")
  if output:
    multihost.run_on_process_zero(paths.check_writable, paths.resolve(output), "--output", folder=False)
  workdir = paths.resolve(workdir)  # gs://bucket/run stays a URL
  config = config if config is not None else run_config.load(workdir)
  files, skipped = expand_queries(list(queries), config)
  if not files:
    raise ValueError(f"no readable query image among {queries} ({len(skipped)} skipped, e.g. {skipped[:1]})")
  images, shown = load_query_images(files, config)  # bad files fail before anything slow
  index = gallery_index.GalleryIndex(workdir)
  latest = _latest_step(workdir)
  if latest is not None and latest > index.step and jax.process_index() == 0:
    print(f"note: the index was built with checkpoint step {index.step} but step {latest} exists; rerun "
          f"--mode=index to search with it", file=sys.stderr)
  vectors = _embed_queries(config, workdir, index, images)  # every process embeds a share of the queries
  # One searcher answers, prints and draws the contact sheet (process 0); every process gets the results.
  depth = {"leaves_to_search": leaves_to_search, "reorder": reorder}
  return host_gather.computed_once(_answer, workdir, config, index, files, shown, vectors, top_k=top_k,
                                   output_format=output_format, out=out, depth=depth, output=output,
                                   skipped=skipped)


def _answer(workdir: str, config, index: gallery_index.GalleryIndex, queries: list[str], shown: list[np.ndarray],
            vectors: np.ndarray, *, top_k: int, output_format: str, out: TextIO, depth: dict | None = None,
            output: str | None = None, skipped: list[dict] | None = None) -> dict[str, Any]:
  """Searches the loaded index (title feedback as configured), writes the contact sheet and the results."""
  searcher = index.searcher
  if depth and any(depth.values()) and searcher.params["mode"] != "brute_force":
    searcher = searcher.with_search_params(**depth)  # one search deeper or shallower; the index is unchanged
  scores, rows, reranked = index.search(vectors, top_k, config, searcher=searcher)
  payload = {"workdir": workdir, "checkpoint_step": index.step, "num_documents": len(index.ids),
             "searcher": searcher.description, "title_feedback": reranked, "skipped": skipped or [], "queries": []}
  for q, path in enumerate(queries):
    results = [{"rank": rank + 1, "id": _text(index.ids[r]), "title": _text(index.titles[r]),
                "score": round(float(scores[q, rank]), 6)}
               for rank, r in enumerate(rows[q]) if r >= 0]
    payload["queries"].append({"query": paths.resolve(path), "results": results})
  sheet = paths.join(workdir, CONTACT_SHEET)
  paths.makedirs(os.path.dirname(sheet))
  drawn = range(min(len(queries), MAX_SHEET_QUERIES))
  caption = lambda q, rank, r: f"{_text(index.titles[r]) or _text(index.ids[r])} | {scores[q, rank]:.2f}"
  plots.contact_sheet(  # written through input_pipeline.paths: a URL workdir's sheet lands in the bucket
      [shown[q] for q in drawn], [[(_document_image(index.image_paths[r]), caption(q, rank, r), None)
                                   for rank, r in enumerate(rows[q]) if r >= 0] for q in drawn],
      sheet, query_captions=[os.path.basename(queries[q]) for q in drawn])
  payload["contact_sheet"] = sheet
  if output:
    lines = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in payload["queries"])
    paths.write_bytes(paths.resolve(output), lines.encode("utf-8"))
    print(f"{len(queries)} queries searched ({len(payload['skipped'])} skipped), top {top_k} each"
          f"{', re-ranked by title feedback' if reranked else ''} -> {output}; contact sheet: {sheet}", file=out)
  elif output_format == "json":
    print(json.dumps(payload, indent=2, ensure_ascii=False), file=out)
  else:
    print(format_table(payload), file=out)
  return payload


def format_table(payload: dict[str, Any]) -> str:
  """Plain-text results: one block per query, then where the contact sheet went."""
  lines = [f"{payload['num_documents']} documents, checkpoint step {payload['checkpoint_step']}, "
           f"{payload['searcher']}{', re-ranked by title feedback' if payload.get('title_feedback') else ''}"]
  for q in payload["queries"]:
    lines.append(f"\nquery: {q['query']}")
    id_width = max([len("id")] + [len(r["id"]) for r in q["results"]])
    lines.append(f"  {'rank':>4}  {'score':>7}  {'id':<{id_width}}  title")
    for r in q["results"]:
      lines.append(f"  {r['rank']:>4}  {r['score']:>7.3f}  {r['id']:<{id_width}}  {r['title']}")
  lines.append(f"\ncontact sheet: {payload['contact_sheet']}")
  return "\n".join(lines)
