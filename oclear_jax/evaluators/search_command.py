r"""`--mode=index` and `--mode=search`: the trained model as a product search engine.

  python -m oclear_jax.main --mode=index --workdir=workdirs/demo
  python -m oclear_jax.main --mode=search --workdir=workdirs/demo --query=photo.jpg [--query=...] \
      [--top_k=10] [--output_format=json]

`index` embeds every document of the run's catalogue (train and eval splits: a shopper
searches the whole catalogue) with the latest checkpoint and writes `{workdir}/index/`
(see `gallery_index`): resumable embedding shards with ids and titles, the serialized ScaNN
searcher, and `index.json` with ScaNN's recall against exact search.

`search` never builds the index itself (embedding a large catalogue can take hours, which a
search command should not start silently): without `{workdir}/index/index.json` it stops and
says to run `--mode=index`. Query files are turned into model inputs exactly as eval queries
are: re-encoded like the records (`input_pipeline.records.encode_image`: RGB, shrunk to
`data.stored_image_size`, JPEG) and then `config.data.eval_preprocess`. Queries are embedded
with the checkpoint the index was built from (never a newer one: the two heads must match).
It prints the top-K documents per query (rank, id, title, score) as a table or as JSON on
stdout, and writes a contact sheet to `{workdir}/search/contact_sheet.png` (queries framed
blue, results grey: a user's search has no ground truth).

Both run in one process (the mesh of `config.mesh` on this host's devices). Both read the
config the training run saved (`{workdir}/config.json`) unless one is passed. Problems a
user can fix (missing files, a file that is not an image, no checkpoint, no index) raise
ValueError / FileNotFoundError naming the file; `main` prints them as one `error: ...` line
with exit code 2.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

import ml_collections
import numpy as np
from PIL import Image

from oclear_jax import config_schema
from oclear_jax.evaluators import gallery_index
from oclear_jax.evaluators import plots

CONTACT_SHEET = os.path.join("search", "contact_sheet.png")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir` (config.json), on top of today's defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} holds no training run; train first "
                            f"(--mode=train) or pass --config=configs/...py")
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); pass --config=configs/...py instead") from e
  config = config_schema.base_config()
  _merge(config, saved, path, "")
  config_schema.validate(config)
  config.lock()
  return config


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _merge(node: ml_collections.ConfigDict, saved: dict, path: str, prefix: str) -> None:
  for key, value in saved.items():
    if key not in node:
      raise ValueError(f"{path}: unknown config key {prefix}{key} (saved by another version of oclear_jax?); "
                       f"pass --config=configs/...py with the run's settings instead")
    if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(node[key], value, path, f"{prefix}{key}.")
    else:
      node[key] = _as_tuples(value)  # JSON has lists where the config has tuples


def build_index(workdir: str, config: ml_collections.ConfigDict | None = None, *, progress: bool = True,
                out: TextIO | None = None) -> dict:
  """Builds `{workdir}/index/` and prints what was built; returns the index manifest."""
  out = out or sys.stdout
  workdir = os.path.abspath(workdir)
  config = config if config is not None else load_run_config(workdir)
  manifest = gallery_index.build(config, workdir, progress=progress)
  m = manifest["catalogue_metrics"]
  print(f"index: {manifest['num_documents']} documents (train + eval splits) embedded with checkpoint step "
        f"{manifest['step']} -> {os.path.join(workdir, gallery_index.INDEX_DIR)}", file=out)
  print(f"searcher: {manifest['searcher']}", file=out)
  print(f"ScaNN recall@10 against exact search: {manifest['scann_recall_vs_exact@10']:.3f} "
        f"({manifest['recall_queries']})", file=out)
  shown = [k for k in ("recall@1", "recall@10", "map@10", "prec@10", "mar@10") if k in m]
  print("exact search over the whole catalogue: " + ", ".join(f"{k} {m[k]:.3f}" for k in shown), file=out)
  return manifest


def load_query_images(paths: list[str], config: ml_collections.ConfigDict) -> tuple[np.ndarray, list[np.ndarray]]:
  """(model inputs f32[Q, H, W, 3] exactly like eval queries, display images uint8) for image files."""
  from input_pipeline import preprocess_ops  # pylint: disable=g-import-not-at-top  (imports TF)
  from input_pipeline import records as records_lib  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  preprocess = preprocess_ops.get_preprocess_fn(config.data.eval_preprocess)
  inputs, shown = [], []
  for i, path in enumerate(paths):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"query image {path} not found")
    jpeg, reason = records_lib.encode_image(path, config.data.stored_image_size or None)
    if jpeg is None:
      raise ValueError(f"query {path} is not a usable image ({reason}); pass a photo (JPEG, PNG, WebP, ...)")
    features = preprocess({"image": tf.constant(jpeg), "seed": tf.constant([0, i], tf.int64)})
    inputs.append(np.asarray(tf.cast(features["image"], tf.float32)))
    with Image.open(path) as image:
      shown.append(_display(image))
  return np.stack(inputs), shown


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
    with Image.open(_text(path)) as image:
      return _display(image)
  except (OSError, ValueError):  # moved or deleted since indexing: a blank tile, not a failed search
    return np.full((64, 64, 3), 230, np.uint8)


def _embed_queries(config, workdir: str, index: gallery_index.GalleryIndex, images: np.ndarray) -> np.ndarray:
  from oclear_jax import sharding  # pylint: disable=g-import-not-at-top  (jax-heavy)
  from oclear_jax import trainer  # pylint: disable=g-import-not-at-top
  from oclear_jax.evaluators import export  # pylint: disable=g-import-not-at-top
  ckpt = os.path.join(workdir, "checkpoints", str(index.step))
  if not os.path.isdir(ckpt):
    raise FileNotFoundError(f"the index in {index.root} was built with checkpoint step {index.step}, which is no "
                            f"longer in {os.path.dirname(ckpt)}; rebuild it: --mode=index --workdir={workdir}")
  prepared = gallery_index.run_records(config, workdir)
  task, state, _ = trainer.restore_trained_state(config, workdir, index.step, prepared=prepared)
  batch_size = config.eval.batch_size
  embed = export.device_embedder(task.jit_predict(), state["params"],
                                 lambda b: sharding.global_batch(b, task.mesh, task.rules), batch_size, "query")
  tokens = np.zeros((len(images), config.data.max_title_len), np.int32)  # queries never read titles
  return np.concatenate([embed({"image": images[s:s + batch_size], "title_tokens": tokens[s:s + batch_size]})
                         for s in range(0, len(images), batch_size)])


def _latest_step(workdir: str) -> int | None:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
  return max(steps, default=None)


def search(workdir: str, queries: list[str], *, top_k: int = 10, output_format: str = "table",
           config: ml_collections.ConfigDict | None = None, out: TextIO | None = None) -> dict[str, Any]:
  """Prints the top-K documents of each query image; returns the results as a dict (the JSON output)."""
  out = out or sys.stdout
  if top_k < 1:
    raise ValueError(f"--top_k={top_k}: ask for at least 1 result")
  if output_format not in ("table", "json"):
    raise ValueError(f"--output_format={output_format!r}: use 'table' or 'json'")
  if not queries:
    raise ValueError("no query images: pass --query=IMAGE (repeat it for several)")
  workdir = os.path.abspath(workdir)
  config = config if config is not None else load_run_config(workdir)
  images, shown = load_query_images(list(queries), config)  # bad files fail before anything slow
  index = gallery_index.GalleryIndex(workdir)
  latest = _latest_step(workdir)
  if latest is not None and latest > index.step:
    print(f"note: the index was built with checkpoint step {index.step} but step {latest} exists; rerun "
          f"--mode=index to search with it", file=sys.stderr)
  vectors = _embed_queries(config, workdir, index, images)
  scores, rows = index.searcher.search(vectors, top_k)
  payload = {"workdir": workdir, "checkpoint_step": index.step, "num_documents": len(index.ids),
             "searcher": index.searcher.description, "queries": []}
  for q, path in enumerate(queries):
    results = [{"rank": rank + 1, "id": _text(index.ids[r]), "title": _text(index.titles[r]),
                "score": round(float(scores[q, rank]), 6)}
               for rank, r in enumerate(rows[q]) if r >= 0]
    payload["queries"].append({"query": os.path.abspath(path), "results": results})
  sheet = os.path.join(workdir, CONTACT_SHEET)
  os.makedirs(os.path.dirname(sheet), exist_ok=True)
  plots.contact_sheet(
      shown, [[(_document_image(index.image_paths[r]), f"{_text(index.titles[r]) or _text(index.ids[r])} | "
                f"{scores[q, rank]:.2f}", None) for rank, r in enumerate(rows[q]) if r >= 0]
              for q in range(len(queries))],
      sheet, query_captions=[os.path.basename(p) for p in queries])
  payload["contact_sheet"] = sheet
  if output_format == "json":
    print(json.dumps(payload, indent=2, ensure_ascii=False), file=out)
  else:
    print(format_table(payload), file=out)
  return payload


def format_table(payload: dict[str, Any]) -> str:
  """Plain-text results: one block per query, then where the contact sheet went."""
  lines = [f"{payload['num_documents']} documents, checkpoint step {payload['checkpoint_step']}, "
           f"{payload['searcher']}"]
  for q in payload["queries"]:
    lines.append(f"\nquery: {q['query']}")
    id_width = max([len("id")] + [len(r["id"]) for r in q["results"]])
    lines.append(f"  {'rank':>4}  {'score':>7}  {'id':<{id_width}}  title")
    for r in q["results"]:
      lines.append(f"  {r['rank']:>4}  {r['score']:>7.3f}  {r['id']:<{id_width}}  {r['title']}")
  lines.append(f"\ncontact sheet: {payload['contact_sheet']}")
  return "\n".join(lines)
