r"""Image-to-multimodal retrieval on the real Myntra sample: frozen kNN vs InfoNCE two-tower vs OCLEAR.

  .venv/bin/python benchmarks/fashion_retrieval.py             # ~8 min warm on 2 shared CPU cores
  .venv/bin/python benchmarks/fashion_retrieval.py --seeds=1 --variants=b2,c3   # a quick look

A cold cache adds the frozen features once: Lite0 over 11,882 photos at 224 px (2-8 min here,
depending on what else runs) and MiniLM over the titles (about 2 min).

Data and protocol. ../shared/data/fashion_small12k with configs/fashion.py: 25% of the articleTypes
are held out (class-disjoint; they appear only at evaluation). Queries are the held-out product
photos (no title); the gallery is the held-out documents (photo + title); leave-one-out: a
query's own document is excluded. Two relevance levels: articleType (coarse) and same-title
groups (fine: same productDisplayName; a query whose title no other held-out product shares has
no positive and is left out of that level -- the table says how many remain). Recall@1/5/10 and
MAP@R (Musgrave et al.) from exact search (`evaluators.exact_search`, `evaluators.metrics`).

Rows, all on the same frozen features (cached on disk, computed once: EfficientNet-Lite0 ImageNet
pooled f32[1280] at 224 px and MiniLM-L6 mean-pooled title vectors f32[384]):
  (a)  the frozen Lite0 image features + cosine kNN (documents use only their image);
  (a') a diagnostic, not a model: (a) after the classic closed-form linear metric for instance
       retrieval, whitening the within-group scatter of the training categories' same-title
       groups -- a check on how much a linear map of these features can gain at the fine level;
  (b)  an InfoNCE two-tower (symmetric, in-batch negatives, learnable temperature) -- query
       tower: the image head; document tower: the image head plus the title fusion;
  (c)  OCLEAR: both views of a product (query and document) are samples of its class, CosFace
       margin softmax over class centres (`heads.margin_softmax_loss`, centres sharded on the
       config's mesh).
Every trained row uses `oclear_jax.frozen_features.HeadTrainer` with configs/fashion.py:frozen:
the same `OclearModel` heads and fusion, optimizer (AdamW, warmup + cosine), steps x batch
(400 x 256 products = 512 embeddings per step), seeds, data order and training products; the
table's variant column says what each row changes.

Class granularity of (c), and why. A same-title group is the finest label the catalogue gives and
the fine level measured here; an articleType alone (36 train classes) teaches "which of the
training categories", which is exactly what does not transfer to held-out categories. Singleton
titles are left out of training (for (b) too, same rows): there the query and document views are
the same photo, so such a class teaches nothing but "spread out". The default adds a second,
coarse label level (articleType, its own centres) to the same-title level: the same-title
softmax pushes different titles of one category apart, the coarse one keeps each category
together, and category structure is what transfers to the held-out categories. Variants with
articleType|colour|gender as the coarse level, with separate heads, and with no title
(image_only) are in the table.

Tried on the same budget and left out of the default sweep (one seed each, same split): embed
128 / 512 / 1024 with hidden 512-2048 (wider was no better beyond seed noise, and slower), lr 3e-4,
CosFace s=20 m=0.2 and ArcFace m=0.3, title dropout 0.2 / 0.8, 'sum' fusion, 'concept_attention'
(3-6 min per run here, no better), per-dimension standardised features, and training on all
products including singleton titles (7.7k classes, 4x slower, no better). The (a') row is there
because no trained row beats (a) at the fine level: a metric fitted in closed form to exactly
that goal does not beat it either, so the limit is in the frozen features, not the optimiser.

Targets (from the issue): (c) beats (a) by >= 8 points articleType R@1, doubles its same-title
R@1, and beats (b); the last lines print each as met or missed, with the numbers measured here.
The (c) row judged is the config's default (c3), against the best (b) row per metric. All
variants were explored on this one held-out split (there is no third split), so every row is
shown. Skips cleanly (exit 0) when the data folder is absent.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from configs import fashion as fashion_config  # noqa: E402
from input_pipeline import catalogue as catalogue_lib  # noqa: E402
from oclear_jax import frozen_features as ff  # noqa: E402
from oclear_jax.evaluators import exact_search  # noqa: E402
from oclear_jax.evaluators import metrics as metrics_lib  # noqa: E402
from oclear_jax.evaluators import plots  # noqa: E402
from oclear_jax.weights import feature_cache  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = (1, 5, 10)
LEVELS = ("articleType", "same title")
# Token grid 4 only so that the cache file is the one benchmarks/fusion_ablation.py also uses.
TOKEN_GRID = 4


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  loss: str  # 'info_nce' | 'oclear'
  fusion: str = "gated"
  shared_heads: bool = True
  levels: tuple[str, ...] = ("title", "articleType")  # OCLEAR label levels (fine first)
  title_dropout: float = 0.5


VARIANTS = (
    Variant("b1 InfoNCE gated, separate heads", "info_nce", shared_heads=False),
    Variant("b2 InfoNCE gated, shared heads", "info_nce"),
    Variant("b3 InfoNCE image_only, shared heads", "info_nce", fusion="image_only"),
    Variant("c1 OCLEAR title, gated, separate heads", "oclear", shared_heads=False, levels=("title",)),
    Variant("c2 OCLEAR title, gated", "oclear", levels=("title",)),
    Variant("c3 OCLEAR title+articleType, gated", "oclear"),
    Variant("c4 OCLEAR title+type|colour|gender, gated", "oclear", levels=("title", "attributes")),
    Variant("c5 OCLEAR title+articleType, image_only", "oclear", fusion="image_only"),
)
HEADLINE = "c3"


# == Data: rows, labels, cached frozen features ==================================================
@dataclasses.dataclass
class Catalogue:
  ids: np.ndarray
  split: np.ndarray
  labels: dict[str, np.ndarray]  # 'articleType', 'title', 'attributes' (articleType|baseColour|gender)
  table: ff.FeatureTable


def load_catalogue(config, cache_dir: str) -> Catalogue:
  data = config.data
  csv_path = os.path.join(data.root, data.csv)
  columns = catalogue_lib.CatalogueColumns(**{k: (v or None) for k, v in data.columns.to_dict().items()})
  rows = catalogue_lib.read_catalogue(csv_path, columns, eval_fraction=data.eval_fraction, split_seed=config.seed).rows
  with open(csv_path, newline="", encoding="utf-8") as f:
    extra = {r["id"]: (r["baseColour"], r["gender"]) for r in csv.DictReader(f)}
  t0 = time.time()
  image = feature_cache.extract_features([r.image_path for r in rows], image_size=fashion_config.IMAGE_SIZE,
                                         batch_size=32, token_grid=TOKEN_GRID, cache_dir=cache_dir, progress=True)
  t1 = time.time()
  text = ff.title_features([r.title for r in rows], cache_dir, max_len=config.data.max_title_len, keep_tokens=False)
  print(f"  frozen features (cached in {os.path.relpath(cache_dir, REPO)}; computed only on a cold cache): "
        f"Lite0 {fashion_config.IMAGE_SIZE}px {t1 - t0:.0f}s, MiniLM titles {time.time() - t1:.0f}s; "
        f"unreadable images: {len(image['failures'])}", flush=True)
  keep = image["ok"]
  art = np.asarray([r.label for r in rows])
  colour_gender = np.asarray(["|".join(extra[r.id]) for r in rows])
  table = ff.FeatureTable(image_pooled=image["pooled"], text_pooled=text["pooled"], text_mask=text["mask"],
                          present=text["present"])
  return Catalogue(ids=np.asarray([r.id for r in rows])[keep], split=np.asarray([r.split for r in rows])[keep],
                   labels={"articleType": art[keep], "title": np.asarray([r.title for r in rows])[keep],
                           "attributes": np.char.add(np.char.add(art, "|"), colour_gender)[keep]},
                   table=table.take(np.flatnonzero(keep)))


def grouped_rows(titles: np.ndarray) -> np.ndarray:
  """Rows whose title at least one other row shares."""
  _, inverse, counts = np.unique(titles, return_inverse=True, return_counts=True)
  return np.flatnonzero(counts[inverse] >= 2)


# == Evaluation ==================================================================================
def evaluate(queries: np.ndarray, docs: np.ndarray, ids: np.ndarray, labels: dict[str, np.ndarray]) -> dict:
  """Leave-one-out exact search once; metrics at both levels."""
  k = int(max(np.unique(labels["articleType"], return_counts=True)[1].max(), max(KS)))  # MAP@R needs k >= R
  _, retrieved = exact_search.exact_top_k(np.asarray(queries, np.float32), np.asarray(docs, np.float32), k,
                                          exclude=(ids, ids))
  retrieved = np.asarray(retrieved)
  return {level: metrics_lib.retrieval_metrics(retrieved, labels[key], labels[key], ks=KS, query_ids=ids,
                                               gallery_ids=ids)
          for level, key in zip(LEVELS, ("articleType", "title"))}


def unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def within_title_whitening(train_x: np.ndarray, train_titles: np.ndarray, reg: float = 1e-2) -> tuple:
  """(mean, P): x -> (x - mean) @ P whitens the scatter of products around their same-title group mean."""
  x = unit(train_x.astype(np.float64))
  rows = grouped_rows(train_titles)
  _, groups = np.unique(train_titles[rows], return_inverse=True)
  means = np.zeros((groups.max() + 1, x.shape[1]))
  np.add.at(means, groups, x[rows])
  means /= np.bincount(groups)[:, None]
  deviations = x[rows] - means[groups]
  scatter = deviations.T @ deviations / len(rows) + reg * np.eye(x.shape[1])
  values, vectors = np.linalg.eigh(scatter)
  return x.mean(0), vectors / np.sqrt(values)


# == Training ====================================================================================
def experiment_config(variant: Variant, args):
  config = fashion_config.get_config(",".join(["frozen"] + ([args.data_root] if args.data_root else [])))
  m = config.model
  m.fusion, m.shared_heads, m.title_dropout = variant.fusion, variant.shared_heads, variant.title_dropout
  if args.steps:
    config.train.num_steps = args.steps
  return config


def run_variant(variant: Variant, cat: Catalogue, train_rows: np.ndarray, eval_rows: np.ndarray, args) -> dict:
  train_table, eval_table = cat.table.take(train_rows), cat.table.take(eval_rows)
  labels, num_classes = None, 0
  if variant.loss == "oclear":
    columns = [np.unique(cat.labels[level][train_rows], return_inverse=True) for level in variant.levels]
    labels = np.stack([inverse for _, inverse in columns], axis=1).astype(np.int32)
    num_classes = tuple(len(names) for names, _ in columns)
  trainer = ff.HeadTrainer(experiment_config(variant, args), ff.Objective(variant.loss), num_classes=num_classes)
  eval_labels = {k: v[eval_rows] for k, v in cat.labels.items()}
  runs, t0, final = [], time.time(), []
  for seed in range(args.seeds):
    params, history = trainer.fit(train_table, labels, seed=seed)
    final.append(history[-1]["loss"])
    runs.append(evaluate(trainer.embed_queries(params, eval_table), trainer.embed_documents(params, eval_table),
                         cat.ids[eval_rows], eval_labels))
  result = {"name": variant.name, "architecture": architecture(variant), "classes": num_classes,
            "final_loss": float(np.mean(final)), "seconds": time.time() - t0, "runs": runs, **mean_of(runs)}
  print(f"  {variant.name:<44} {summary(result)}  classes {num_classes or '-'}, final loss "
        f"{result['final_loss']:.3f}, {result['seconds']:.0f}s", flush=True)
  return result


def architecture(variant: Variant) -> str:
  heads = "shared heads" if variant.shared_heads else "separate heads"
  if variant.fusion == "image_only":
    return f"{variant.fusion}, {heads}"
  return f"{variant.fusion}, {heads}, title dropout {variant.title_dropout}"


def mean_of(runs: list[dict]) -> dict:
  return {"mean": {lv: {m: float(np.mean([r[lv][m] for r in runs])) for m in runs[0][lv]} for lv in LEVELS},
          "spread": {lv: {m: float(np.ptp([r[lv][m] for r in runs])) for m in runs[0][lv]} for lv in LEVELS}}


def summary(result: dict) -> str:
  return "  ".join(f"{lv} R@1 {result['mean'][lv]['recall@1']:.3f} MAP@R {result['mean'][lv]['map@r']:.3f}"
                   for lv in LEVELS)


# == Report ======================================================================================
def print_table(results: list[dict], seeds: int) -> None:
  metrics = [f"recall@{k}" for k in KS] + ["map@r"]
  counts = {lv: int(results[0]["mean"][lv]["num_queries"]) for lv in LEVELS}
  print(f"\nHeld-out categories, leave-one-out. Trained rows: mean over {seeds} seed(s); "
        f"+- is the max-min spread between seeds.")
  print("  " + "; ".join(f"{lv}: {counts[lv]} queries with a positive "
                         f"({int(results[0]['mean'][lv]['num_queries_without_positives'])} without, left out)"
                         for lv in LEVELS))
  names = {"recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10", "map@r": "MAP@R"}
  width = 14 if seeds > 1 else 7
  line1 = f"{'':<46}" + "".join(f"{lv:<{width * len(metrics)}}" for lv in LEVELS)
  line2 = f"{'':<46}" + "".join(f"{names[m]:<{width}}" for _ in LEVELS for m in metrics) + f"{'time':>7}"
  print(line1 + "\n" + line2 + "\n" + "-" * len(line2))
  for r in results:
    cells = []
    for lv in LEVELS:
      for m in metrics:
        trained = seeds > 1 and r.get("runs")
        spread = f" +-{r['spread'][lv][m]:.3f}" if trained else ""
        cells.append(f"{r['mean'][lv][m]:.3f}" + (f"{spread:<8}" if seeds > 1 else ""))
    print(f"{r['name']:<46}" + "".join(f"{c:>{width}}" for c in cells) + f"{r.get('seconds', 0):>6.0f}s")


def print_targets(results: list[dict]) -> dict[str, bool]:
  by_tag = {r["name"].split()[0]: r for r in results}
  base, headline = by_tag["(a)"], by_tag.get(HEADLINE)
  infonce = [r for r in results if r["name"].startswith("b")]
  if headline is None:
    print(f"\nTargets: not judged ({HEADLINE} was not run).")
    return {}
  r1 = lambda r, lv: r["mean"][lv]["recall@1"]
  art_gain = r1(headline, LEVELS[0]) - r1(base, LEVELS[0])
  title_ratio = r1(headline, LEVELS[1]) / r1(base, LEVELS[1])
  met = {"articleType R@1 >= (a) + 0.08": art_gain >= 0.08, "same-title R@1 >= 2 x (a)": title_ratio >= 2.0}
  print(f"\nTargets, judged on {headline['name']}:")
  print(f"  articleType R@1 {r1(headline, LEVELS[0]):.4f} vs (a) {r1(base, LEVELS[0]):.4f}: {art_gain:+.4f} "
        f"(target +0.08; the most any model could gain here is {1 - r1(base, LEVELS[0]):+.4f}) -> "
        f"{'MET' if met['articleType R@1 >= (a) + 0.08'] else 'MISSED'}")
  print(f"  same-title R@1 {r1(headline, LEVELS[1]):.4f} vs (a) {r1(base, LEVELS[1]):.4f}: x{title_ratio:.2f} "
        f"(target x2.00) -> {'MET' if met['same-title R@1 >= 2 x (a)'] else 'MISSED'}")
  if infonce:
    wins = []
    for lv in LEVELS:
      best = max(infonce, key=lambda r, lv=lv: r1(r, lv))
      wins.append(r1(headline, lv) > r1(best, lv))
      print(f"  vs best (b) at {lv}: R@1 {r1(headline, lv):.4f} vs {r1(best, lv):.4f} ({best['name'].split()[0]}); "
            f"MAP@R {headline['mean'][lv]['map@r']:.4f} vs {max(r['mean'][lv]['map@r'] for r in infonce):.4f}")
    met["beats (b) at R@1 on both levels"] = all(wins)
    print(f"  beats (b) on R@1 at both levels -> {'MET' if all(wins) else 'MISSED'}")
    oclear = [r for r in results if r["name"].startswith("c")]
    best = {lv: (max(oclear, key=lambda r, lv=lv: r1(r, lv)), max(infonce, key=lambda r, lv=lv: r1(r, lv)))
            for lv in LEVELS}
    print("  best rows per level, any model: " + "; ".join(
        f"{lv} R@1 {c['name'].split()[0]} {r1(c, lv):.4f} (spread {c['spread'][lv]['recall@1']:.3f}) vs "
        f"{b['name'].split()[0]} {r1(b, lv):.4f} (spread {b['spread'][lv]['recall@1']:.3f})"
        for lv, (c, b) in best.items()))
    any_row = [c for c in oclear if all(r1(c, lv) > r1(b, lv) for lv in LEVELS for b in infonce)]
    met["some (c) row beats every (b) row at R@1 on both levels"] = bool(any_row)
    print(f"  some (c) row beats every (b) row on R@1 at both levels -> "
          f"{'MET by ' + ', '.join(c['name'].split()[0] for c in any_row) if any_row else 'MISSED'}")
    print("Same model, InfoNCE vs OCLEAR (R@1 articleType / same title):")
    for arch in dict.fromkeys(r["architecture"] for r in results if "architecture" in r):
      pair = [r for r in results if r.get("architecture") == arch]
      print(f"  {arch:<44} " + "   ".join(
          f"{r['name'].split()[0]} {r1(r, LEVELS[0]):.3f} / {r1(r, LEVELS[1]):.3f}" for r in pair))
  return met


# == Main ========================================================================================
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default="all", help="comma-separated tags (b1,c3,...) or 'all'")
  parser.add_argument("--steps", type=int, default=0, help="0: configs/fashion.py:frozen's train.num_steps")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--train_products", choices=("grouped", "all"), default="grouped",
                      help="grouped: only products whose title another training product shares")
  parser.add_argument("--data_root", default="", help="catalogue folder; default: configs/fashion.py's")
  parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "fashion_retrieval"))
  args = parser.parse_args()
  t_start = time.time()
  config = fashion_config.get_config(",".join(["frozen"] + ([args.data_root] if args.data_root else [])))
  if not os.path.exists(os.path.join(config.data.root, config.data.csv)):
    print(f"fashion_retrieval: skipped, {os.path.join(config.data.root, config.data.csv)} not found")
    return
  os.makedirs(args.workdir, exist_ok=True)
  print("Frozen towers with features cached on disk (EfficientNet-Lite0 ImageNet, MiniLM-L6); trained: heads + "
        f"fusion (+ class centres for OCLEAR), {config.train.num_steps if not args.steps else args.steps} steps x "
        f"{config.train.batch_size} products, {args.seeds} seed(s).", flush=True)
  cat = load_catalogue(config, args.workdir)
  train_rows, eval_rows = np.flatnonzero(cat.split == "train"), np.flatnonzero(cat.split == "eval")
  if args.train_products == "grouped":
    train_rows = train_rows[grouped_rows(cat.labels["title"][train_rows])]
  print(f"  train: {len(train_rows)} products ({args.train_products}), "
        f"{len(set(cat.labels['articleType'][train_rows]))} articleTypes, "
        f"{len(set(cat.labels['title'][train_rows]))} titles; eval: {len(eval_rows)} products, "
        f"{len(set(cat.labels['articleType'][eval_rows]))} held-out articleTypes", flush=True)

  eval_labels = {k: v[eval_rows] for k, v in cat.labels.items()}
  eval_ids, eval_x = cat.ids[eval_rows], cat.table.image_pooled[eval_rows]
  raw = unit(eval_x)
  results = [{"name": "(a) frozen Lite0 + cosine kNN", **mean_of([evaluate(raw, raw, eval_ids, eval_labels)])}]
  mean, projection = within_title_whitening(cat.table.image_pooled[train_rows], cat.labels["title"][train_rows])
  white = unit((unit(eval_x.astype(np.float64)) - mean) @ projection)
  results.append({"name": "(a') diagnostic: (a) + title-group whitening",
                  **mean_of([evaluate(white, white, eval_ids, eval_labels)])})
  for r in results:
    print(f"  {r['name']:<44} {summary(r)}", flush=True)
  wanted = None if args.variants == "all" else set(args.variants.split(","))
  for variant in VARIANTS:
    if wanted is None or variant.name.split()[0] in wanted:
      results.append(run_variant(variant, cat, train_rows, eval_rows, args))

  print_table(results, args.seeds)
  met = print_targets(results)
  plots.plot_recall_at_k({r["name"].split()[0]: {k: r["mean"][LEVELS[1]][f"recall@{k}"] for k in KS}
                          for r in results}, os.path.join(args.workdir, "same_title_recall.png"),
                         title="Same-title Recall@K, held-out categories")
  with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"args": vars(args), "targets": met, "results": results}, f, indent=1)
  print(f"\nTotal {time.time() - t_start:.0f}s; results.json and same_title_recall.png in "
        f"{os.path.relpath(args.workdir, REPO)}")


if __name__ == "__main__":
  main()
