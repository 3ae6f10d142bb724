r"""Retrieval on a real catalogue: frozen pretrained tower vs trained models, with and without titles.

  .venv/bin/python benchmarks/real_retrieval.py                     # both Myntra folders, 2 seeds
  .venv/bin/python benchmarks/real_retrieval.py --seeds=1 --rows=oclear

The catalogue is governed once into product categories (configs/fashion_products.py: same titles,
colour variants, single products; fashion_small12k + fashion_thumbs32k, split by category so no
product is on both sides; val and eval only from the full-resolution folder). Every trained row
runs through the one trainer (`trainer.train_and_evaluate`) with configs/fashion_products.py plus
the row's overrides, and leaves a run directory that `--mode=embed` / `--mode=index` can use; the
row is scored with the checkpoint the run selected on its validation split.

Evaluation: held-out products, leave-one-out (each eval image queries all other eval documents),
exact search; metrics at three levels of "the same thing": the same title, the product category
(one product's colour variants: the level the model is trained on) and the articleType. Document columns:
  image+title  documents through the document head and the title fusion;
  image only   the same model with every title removed (the fusion then returns the image term);
  +PRF         image+title ranking re-ranked by the titles of the top results (pseudo-relevance
               feedback, retrieval/title_feedback.py): titles act at search time, where the
               query has none.
Trained rows: mean over seeds, +- the max-min spread; wall time per row (training + scoring).
`--catalogue=CSV --label_column=...`: afterwards, the trained rows' seed-0 models applied zero-shot to
another catalogue (images and titles through the towers, `--mode=embed`'s path), leave-one-out at
that label, beside the frozen tower on the same images.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import fashion_products  # noqa: E402
from input_pipeline import images as images_lib  # noqa: E402
from oclear_jax import run_data  # noqa: E402
from oclear_jax.serving import trained_run  # noqa: E402
from oclear_jax import models  # noqa: E402
from oclear_jax.features import tower_features  # noqa: E402
from oclear_jax.train import trainer  # noqa: E402
from oclear_jax.serving import catalogue_embedding  # noqa: E402
from oclear_jax.retrieval import exact_search  # noqa: E402
from oclear_jax.retrieval import metrics as metrics_lib  # noqa: E402
from oclear_jax.retrieval import title_feedback  # noqa: E402
from oclear_jax.commands import govern as governance_command  # noqa: E402
from oclear_jax.models import title_match  # noqa: E402
from oclear_jax.features import feature_cache  # noqa: E402

LEVELS = ("same title", "product category", "articleType")
# product category: the governed training label (colour variants of one product, or one title where
# stripping colours left it too generic); same title: the exact normalised title.
LEVEL_COLUMNS = ("title_group", "label", "coarse_label")
DOCS = ("image+title", "image only", "+PRF")
KS = (1, 5, 10)
PRF_DOCS, PRF_WEIGHT = 3, 0.4
# name -> (what it is, config overrides on configs/fashion_products.py)
ROWS = {
    "oclear": ("OCLEAR heads (identity linear, bounded title, title match)", {}),
    "oclear_no_match": ("OCLEAR heads without title matching (bounded title only)", {"model.title_match_dim": 0}),
    "oclear_gated": ("OCLEAR heads, per-dimension gated title (the old fusion)", {"model.fusion": "gated"}),
    "oclear_mlp": ("OCLEAR heads, random MLP head (the old recipe)",
                   {"model.head": "mlp", "model.embed_dim": 256, "model.head_hidden": 1024}),
    "info_nce": ("InfoNCE two-tower, same heads and budget", {"head.loss": "info_nce"}),
    # The image tower's last layer (its 1x1 head conv, 7x7x320 -> 1280) fine-tuned at a tenth of the
    # learning rate on cached trunk activations of 2 views per image (an eval view and an augmented one).
    "oclear_ft": ("OCLEAR, image tower fine-tuned from block 16",
                  {"data.input": "trunk_activations", "model.freeze_image_tower": False,
                   "model.image_trainable_from": 16, "optimizer.pretrained_lr_scale": 0.1}),
    # The same 2 views per image with the tower's last layer held still (learning rate 0): what the
    # augmented view alone adds to the heads-only row.
    "oclear_views": ("OCLEAR heads on 2 views per image (tower frozen)",
                     {"data.input": "trunk_activations", "model.freeze_image_tower": False,
                      "model.image_trainable_from": 16, "optimizer.pretrained_lr_scale": 0.0}),
}


# == Data: governed once, features cached once ===================================================
def base_config(args):
  config = fashion_products.get_config(args.data_root or None)
  if args.steps:
    config.train.num_steps = args.steps
  config.data.records_dir = os.path.join(args.workdir, "base", "records")
  config.data.feature_cache = args.feature_cache or os.path.join(args.workdir, "features")
  return config


def govern_once(config, workdir: str) -> None:
  base = os.path.join(workdir, "base")
  if not os.path.exists(run_data.governed_catalogue_path(base)):
    governance_command.run(config, base)


def eval_levels(workdir: str, ids: np.ndarray) -> dict[str, np.ndarray]:
  """{level: labels of `ids`} from the curated catalogue's columns."""
  with open(run_data.governed_catalogue_path(os.path.join(workdir, "base")), newline="", encoding="utf-8") as f:
    by_id = {r["id"]: r for r in csv.DictReader(f)}
  return {level: np.asarray([by_id[i][column] for i in ids]) for level, column in zip(LEVELS, LEVEL_COLUMNS)}


def row_workdir(args, name: str, seed: int) -> str:
  path = os.path.join(args.workdir, "rows", name, f"seed{seed}")
  os.makedirs(path, exist_ok=True)
  link = os.path.join(path, "governance")
  if not os.path.exists(link):
    os.symlink(os.path.abspath(os.path.join(args.workdir, "base", "governance")), link)  # valid from any cwd
  return path


# == Scoring =====================================================================================
def unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def score(queries, docs, ids, levels, titles=None) -> dict[str, dict[str, float]]:
  """Leave-one-out exact search once; metrics per level; with `titles`, after title feedback."""
  depth = int(max(max(np.unique(v, return_counts=True)[1].max() for v in levels.values()), max(KS)))
  scores, retrieved = exact_search.exact_top_k(np.asarray(queries, np.float32), np.asarray(docs, np.float32),
                                               depth, exclude=(ids, ids))
  if titles is not None:
    scores, retrieved = title_feedback.rerank(np.asarray(scores), np.asarray(retrieved), titles,
                                              feedback_docs=PRF_DOCS, weight=PRF_WEIGHT)
  retrieved = np.asarray(retrieved)
  return {level: metrics_lib.retrieval_metrics(retrieved, labels, labels, ks=KS, query_ids=ids, gallery_ids=ids)
          for level, labels in levels.items()}


def embed_eval(model: trained_run.TrainedModel, table: tower_features.FeatureTable) -> dict[str, np.ndarray]:
  """Queries, image+title documents and image-only documents of the eval rows from cached features."""
  batch = table.device_batch(np.arange(len(table)))
  variables = {"params": model.params}
  apply = lambda *a, method: np.asarray(model.model.apply(variables, *a, method=method))
  tokens = jnp.asarray(batch["image_tokens"], jnp.float32)

  def documents(present):
    title = None if model.config.model.fusion == "image_only" else models.TitleFeatures(
        jnp.asarray(batch["text_tokens"], jnp.float32), batch["text_pooled"], batch["text_mask"], present)
    return apply(tokens, batch["image_pooled"], title, method="documents_from_features")
  return {"queries": apply(batch["image_pooled"], method="queries_from_features"),
          "docs": documents(batch["present"]), "image_docs": documents(np.zeros_like(batch["present"]))}


def score_embeddings(emb, ids, levels, titles) -> dict[str, dict]:
  return {"image+title": score(emb["queries"], emb["docs"], ids, levels),
          "image only": score(emb["queries"], emb["image_docs"], ids, levels),
          "+PRF": score(emb["queries"], emb["docs"], ids, levels, titles)}


# == Rows ========================================================================================
def frozen_row(splits, levels, titles) -> dict:
  x = unit(splits["eval"].table.image_pooled)
  emb = {"queries": x, "docs": x, "image_docs": x}
  return {"name": "frozen EfficientNet-Lite0, cosine kNN", "runs": [score_embeddings(emb, splits["eval"].ids,
                                                                                    levels, titles)]}


def trained_row(args, name: str, splits, levels, titles) -> dict:
  label, overrides = ROWS[name]
  runs, t0 = [], time.time()
  for seed in range(args.seeds):
    config = base_config(args)
    config.update_from_flattened_dict({**overrides, "seed": seed})
    workdir = row_workdir(args, name, seed)
    result = trainer.train_and_evaluate(config, workdir, progress=False)
    model = trained_run.restore_trained_model(config, workdir)
    print(f"  {name} seed {seed}: trained {result['final_step']} steps, scored checkpoint {model.step} "
          f"(selected on val)", flush=True)
    runs.append(score_embeddings(embed_eval(model, splits["eval"].table), splits["eval"].ids, levels, titles))
    print("    " + "; ".join(f"{doc}: " + ", ".join(
        f"{level} R@1 {runs[-1][doc][level]['recall@1']:.3f} MAP@R {runs[-1][doc][level]['map@r']:.3f}"
        for level in LEVELS[:2]) for doc in DOCS), flush=True)
  return {"name": label, "runs": runs, "seconds": time.time() - t0}


def title_weight_sweep(args, splits, weights=(0.0, 0.25, 0.5, 0.75, 1.0)) -> None:
  """The seed-0 'oclear' model with other model.title_match_weight values, on val (where a user would
  choose it) and eval: the weight only scales the title parts, so one trained model serves every row."""
  config = base_config(args)
  config.update_from_flattened_dict({**ROWS["oclear"][1], "seed": 0})
  model, e = trained_run.restore_trained_model(config, row_workdir(args, "oclear", 0)), config.model.embed_dim
  print(f"\nmodel.title_match_weight w, seed-0 oclear model (trained with w={config.model.title_match_weight}), "
        f"image+title documents, R@1 / MAP@R:")
  for split in ("val", "eval"):
    emb, levels = embed_eval(model, splits[split].table), eval_levels(args.workdir, splits[split].ids)
    (qa, qb), (da, db) = (map(np.asarray, title_match.split(x, e)) for x in (emb["queries"], emb["docs"]))
    for w in weights:
      r = score(np.concatenate([qa, np.sqrt(w) * qb], 1), np.concatenate([da, np.sqrt(w) * db], 1),
                splits[split].ids, levels)
      print(f"  {split:5s} w={w:<5}" + "".join(f"  {lv} {r[lv]['recall@1']:.3f} / {r[lv]['map@r']:.3f}"
                                              for lv in LEVELS), flush=True)


# == Zero-shot on another catalogue =============================================================
def zero_shot(args, keys: list[str]) -> list[dict]:
  """The frozen tower and each trained row's seed-0 model on `args.catalogue`, leave-one-out at its label."""
  rows, t0 = [], time.time()
  for key in keys:
    config = base_config(args)
    config.update_from_flattened_dict(ROWS[key][1])
    config.data.columns.update(dict(id=args.id_column, image=args.image_column, title=args.title_column,
                                    label=args.label_column))
    model = trained_run.restore_trained_model(config, row_workdir(args, key, 0))
    embedded = catalogue_embedding.embed_catalogue(model, args.catalogue, with_label=True, progress=False)
    ids, labels = np.asarray(embedded.ids), {args.label_column: np.asarray(embedded.labels)}
    if not rows:  # the frozen tower and the title vectors, on exactly the rows the models embedded
      paths = list(embedded.image_paths)
      x = unit(feature_cache.extract_features(paths, image_size=config.data.stored_image_size,
                                              cache_dir=config.data.feature_cache, progress=False)["pooled"])
      text = tower_features.title_features(list(embedded.titles), config.data.feature_cache,
                                           max_len=config.data.max_title_len, keep_tokens=False)
      titles = title_feedback.title_vectors(text["pooled"], text["present"],
                                            mean=title_feedback.title_mean(text["pooled"], text["present"]))
      emb = {"queries": x, "docs": x, "image_docs": x}
      rows.append({"key": "frozen", "name": "frozen EfficientNet-Lite0, cosine kNN",
                   "runs": [score_embeddings(emb, ids, labels, titles)]})
    emb = {"queries": embedded.queries, "docs": embedded.documents,
           "image_docs": _image_only_documents(model, list(embedded.image_paths))}
    rows.append({"key": key, "name": ROWS[key][0], "runs": [score_embeddings(emb, ids, labels, titles)],
                 "seconds": time.time() - t0})
  return rows


def _image_only_documents(model: trained_run.TrainedModel, paths: list[str]) -> np.ndarray:
  """The same model's documents of these (readable) images with every title removed."""
  embed, size, out = model.embedder("doc"), model.config.eval.batch_size, []
  for start in range(0, len(paths), size):
    images, kept, _ = images_lib.preprocess_image_files(paths[start:start + size], model.config.data, first_index=start)
    out.append(embed({"image": images, "title_tokens": model.tokenize([""] * len(kept))}))
  return np.concatenate(out)


# == Report ======================================================================================
def cell(row, doc, level, metric) -> tuple[float, float]:
  values = [run[doc][level][metric] for run in row["runs"]]
  return float(np.mean(values)), float(np.ptp(values))


def print_table(rows: list[dict], levels=LEVELS) -> None:
  for level in levels:
    n = int(rows[0]["runs"][0]["image+title"][level]["num_queries"])
    print(f"\n{level}: {n} queries with a positive (R@1 / MAP@R; trained rows: mean +- spread over seeds)")
    print(f"{'':<58}" + "".join(f"{doc:<28}" for doc in DOCS) + "time")
    for row in rows:
      cells = []
      for doc in DOCS:
        (r1, s1), (ap, s2) = cell(row, doc, level, "recall@1"), cell(row, doc, level, "map@r")
        spread = f"+-{max(s1, s2):.3f}" if len(row["runs"]) > 1 else ""
        cells.append(f"{r1:.3f} / {ap:.3f} {spread:<9}")
      print(f"{row['name']:<58}" + "".join(f"{c:<28}" for c in cells) + f"{row.get('seconds', 0):>5.0f}s")


def print_targets(rows: list[dict]) -> None:
  """The issue's targets at both same-product levels, for the heads-only and the fine-tuned rows."""
  by = {r["key"]: r for r in rows}
  mean = lambda key, doc, level, metric: cell(by[key], doc, level, metric)[0]
  for level in LEVELS[:2]:
    print(f"\nTargets at the same-product level '{level}' (image+title documents unless said):")
    f_r1, f_ap = mean("frozen", "image+title", level, "recall@1"), mean("frozen", "image+title", level, "map@r")
    for key in [k for k in ("oclear", "oclear_ft") if k in by]:
      r1, ap = mean(key, "image+title", level, "recall@1"), mean(key, "image+title", level, "map@r")
      img = mean(key, "image only", level, "map@r")
      print(f"  {key}: R@1 {r1:.3f} vs frozen {f_r1:.3f}: {r1 - f_r1:+.3f} (target +0.05) "
            f"{'MET' if r1 - f_r1 >= 0.05 else 'MISSED'}; MAP@R {ap:.3f} vs {f_ap:.3f}: x{ap / f_ap:.2f} "
            f"(target x1.25) {'MET' if ap >= 1.25 * f_ap else 'MISSED'}; image+title vs image-only MAP@R "
            f"{ap:.3f} vs {img:.3f} {'MET' if ap > img else 'MISSED'}")
      p_r1, p_ap = mean(key, "+PRF", level, "recall@1"), mean(key, "+PRF", level, "map@r")
      fp_r1, fp_ap = mean("frozen", "+PRF", level, "recall@1"), mean("frozen", "+PRF", level, "map@r")
      print(f"    with title feedback on both sides: R@1 {p_r1:.3f} vs {fp_r1:.3f}, MAP@R {p_ap:.3f} vs {fp_ap:.3f} "
            f"(x{p_ap / fp_ap:.2f}); {key} with title feedback vs frozen kNN: R@1 {p_r1 - f_r1:+.3f}, "
            f"MAP@R x{p_ap / f_ap:.2f}")
    if "oclear" in by and "info_nce" in by:
      o_r1, n_r1 = mean("oclear", "image+title", level, "recall@1"), mean("info_nce", "image+title", level, "recall@1")
      print(f"  OCLEAR vs InfoNCE, R@1 {o_r1:.3f} vs {n_r1:.3f} {'MET' if o_r1 > n_r1 else 'MISSED'}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated trained rows of {list(ROWS)}")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=0, help="0: configs/fashion_products.py's train.num_steps")
  parser.add_argument("--data_root", default="", help="the folder holding fashion_small12k/ and fashion_thumbs32k/")
  parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "real_retrieval"))
  parser.add_argument("--catalogue", default="", help="another catalogue CSV to evaluate the trained models on")
  parser.add_argument("--label_column", default="articleType")
  parser.add_argument("--id_column", default="id")
  parser.add_argument("--image_column", default="image")
  parser.add_argument("--title_column", default="productDisplayName")
  parser.add_argument("--feature_cache", default="", help="frozen-tower feature cache to share with other runs "
                      "(keyed by the image set, size and weights); default WORKDIR/features")
  args = parser.parse_args()
  t_start = time.time()
  config = base_config(args)
  if not os.path.exists(os.path.join(config.data.root, config.data.csv)):
    print(f"real_retrieval: skipped, {os.path.join(config.data.root, config.data.csv)} not found")
    return
  govern_once(config, args.workdir)
  prepared = run_data.prepare_data(config.data, os.path.join(args.workdir, "base"), seed=config.seed, progress=False)
  splits = tower_features.load_feature_splits(config, prepared, os.path.join(args.workdir, "base"))
  levels = eval_levels(args.workdir, splits["eval"].ids)
  train = splits["train"].table
  titles = title_feedback.title_vectors(splits["eval"].table.text_pooled, splits["eval"].table.present,
                                        mean=train.text_pooled[train.present].mean(0))
  print(f"train {len(splits['train'])} rows, {len(set(splits['train'].labels.tolist()))} categories; "
        f"val {len(splits.get('val', []))}; eval {len(splits['eval'])} rows", flush=True)
  rows = [{"key": "frozen", **frozen_row(splits, levels, titles)}]
  for name in [r for r in args.rows.split(",") if r]:
    rows.append({"key": name, **trained_row(args, name, splits, levels, titles)})
  print_table(rows)
  print_targets(rows)
  if "oclear" in args.rows.split(",") and base_config(args).model.title_match_dim:
    title_weight_sweep(args, splits)
  if args.catalogue:
    print(f"\nZero-shot on {args.catalogue} (leave-one-out at {args.label_column}; seed-0 models):")
    print_table(zero_shot(args, [r["key"] for r in rows if r["key"] in ROWS]), levels=(args.label_column,))
  print(f"Total {time.time() - t_start:.0f}s; run directories under {os.path.relpath(args.workdir, REPO)}/rows")


if __name__ == "__main__":
  main()
