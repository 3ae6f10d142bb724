r"""Exact vs ScaNN search on a million clustered embeddings: build time, queries/s, recall@10.

  python benchmarks/retrieval_speed.py                          # 1,000,000 x 256, 10,000 queries
  python benchmarks/retrieval_speed.py --n=100000 --queries=2000  # a quick run

The gallery imitates product embeddings, not isotropic noise (on which every ANN method looks
bad): unit vectors around product centres, which themselves sit around category centres
(`--categories`, `--products`), so neighbourhoods are clustered and neighbouring clusters overlap.
Queries are fresh draws from the same products (a new photo of a catalogued product), not
perturbed copies of gallery rows. How hard that is depends on `--spread` (a row's offset from
its product); the run prints the share of each query's exact top 10 that are rows of its own
product. The default 0.8 gives about 0.85-0.87: a good but imperfect retrieval model.
At 100k rows, --spread=0.4 (0.98: well separated) reaches recall 0.97 probing 1 % of the leaves,
while --spread=1.0 (noisier than a trained model) stays below 0.9 at 8 %: the ANN settings must
be tuned on real embeddings, and this script is the tool for it (--n, --spread, --leaves).

Contenders, all timed in this run on this machine over the same queries:
  exact JAX      `exact_search.exact_top_k` (jitted matmul + `lax.top_k`, chunked over the gallery);
                 its (query batch, gallery chunk) is tuned on a query subset first;
  exact ScaNN    ScaNN's brute-force scorer (multi-threaded);
  ScaNN          `ScannIndex` as the project builds it (tree with ~sqrt(n) leaves + AH + reorder),
                 then a sweep of the search-time knobs (leaves searched, reorder depth) on the
                 same built index: the recall/speed curve (PNG).
The ground truth for recall@10 (|ScaNN top 10 ∩ exact top 10| / 10) is the exact JAX result.
The table ends with the fastest ScaNN setting reaching the recall target and its speed-up
over the fastest exact search. Flags --num_leaves, --training_sample, --soar_lambda and
--spherical change how the tree is built.

Measured (2 shared CPU cores, load average 4-10 from other jobs during the runs, so absolute
numbers are low; every row of a table shares the same conditions):
  1M x 256, spread 0.8 (0.85 of the exact top 10 are the query's product), 10k queries:
    fastest exact: ScaNN brute force 86 q/s (JAX 62 q/s). Default tree (1,000 leaves):
    recall 0.836 at 1,191 q/s (search 100 leaves), 0.953 at 572 q/s (300 leaves, 6.6x).
    With --soar_lambda=1.5 --training_sample=300000: 0.943 at 844 q/s (100 leaves, 9.8x),
    0.965 at 484 q/s (200 leaves, 5.6x). The 10x-at-0.95 target is missed on this data: the
    partition, not AH or the reorder depth, limits recall (reorder 40 vs 100 barely moves it;
    AH with 4 dims per block, 2,000 leaves and spherical k-means did not help either).
  100k x 256, spread 0.4 (0.98 same product), 2k queries: 0.959 at 20.7x the brute force.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tqdm  # noqa: E402

from oclear_jax.evaluators import exact_search  # noqa: E402
from oclear_jax.evaluators import metrics  # noqa: E402
from oclear_jax.evaluators import scann_search  # noqa: E402


def clustered_embeddings(n, num_queries, dim, *, categories, products, spread, seed):
  """(gallery f32[n, dim], queries f32[Q, dim]): unit vectors around products around categories.

  Real embeddings are anisotropic (a decaying spectrum: a few directions carry most of the
  variance), which puts many near neighbours at similar distances; every offset is drawn with
  the spectrum `i ** -0.5`, and `spread` scales the row offsets (larger: harder).
  """
  rng = np.random.default_rng(seed)
  spectrum = (np.arange(1, dim + 1) ** -0.5).astype(np.float32)

  def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

  def direction(count):
    return unit(rng.standard_normal((count, dim), np.float32) * spectrum)

  category = direction(categories)
  # A product is its category plus a product-specific direction.
  product = unit(category[rng.integers(0, categories, products)] + direction(products))
  # Zipf-like product popularity: a few products own many catalogue rows, most own a handful.
  weights = 1.0 / np.arange(1, products + 1) ** 0.5
  weights = rng.permutation(weights / weights.sum())

  def draw(count, desc):
    out = np.empty((count, dim), np.float32)
    owners = rng.choice(products, count, p=weights)
    step = 200_000
    for s in tqdm.trange(0, count, step, desc=desc, leave=False):
      m = min(step, count - s)
      # Each row: its product plus a row-specific offset (another photo of the same product).
      out[s:s + m] = unit(product[owners[s:s + m]] + spread * direction(m))
    return out, owners

  return draw(n, "gallery"), draw(num_queries, "queries")


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def tune_exact_jax(gallery, queries, k):
  """(query_batch, gallery_chunk) with the best queries/s on 1,024 queries (compile excluded)."""
  best = None
  subset = queries[:1024]
  for batch, chunk in ((256, 16384), (512, 65536), (1024, 131072), (1024, 262144)):
    batch = min(batch, len(subset))
    exact_search.exact_top_k(subset[:batch], gallery[:chunk * 2], k, gallery_chunk=chunk, query_batch=batch)
    _, seconds = timed(lambda: exact_search.exact_top_k(subset, gallery, k, gallery_chunk=chunk, query_batch=batch))
    qps = len(subset) / seconds
    print(f"  exact JAX tuning: query_batch={batch:5d} gallery_chunk={chunk:6d}: {qps:8.1f} queries/s", flush=True)
    if best is None or qps > best[0]:
      best = (qps, batch, chunk)
  return best[1], best[2]


def print_table(rows, columns):
  cells = [[r[c] if isinstance(r[c], str) else f"{r[c]:,.3f}" if isinstance(r[c], float) else f"{r[c]:,}"
            for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
            for row in cells]
  print("\n".join(lines), flush=True)
  return "\n".join(lines)


def plot_curve(curve, exact_rows, path, target):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7, 5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for reorder in sorted({c["reorder"] for c in curve}):
    points = sorted((c for c in curve if c["reorder"] == reorder), key=lambda c: c["leaves"])
    ax.plot([c["recall@10"] for c in points], [c["queries/s"] for c in points], marker="o",
            label=f"ScaNN reorder {reorder}")
    for c in points:
      ax.annotate(str(c["leaves"]), (c["recall@10"], c["queries/s"]), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
  for row in exact_rows:
    ax.axhline(row["queries/s"], linestyle="--", color="grey")
    ax.annotate(row["method"], (0.0, row["queries/s"]), xycoords=("axes fraction", "data"), fontsize=8,
                xytext=(3, 3), textcoords="offset points")
  ax.axvline(target, linestyle=":", color="red")
  ax.set_yscale("log")
  ax.set_xlabel("recall@10 against exact search")
  ax.set_ylabel("queries / s (log scale)")
  ax.set_title("Recall / speed (numbers: leaves searched)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=1_000_000, help="gallery size")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--queries", type=int, default=10_000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--categories", type=int, default=0, help="0: n / 500")
  parser.add_argument("--products", type=int, default=0, help="0: n / 20")
  parser.add_argument("--spread", type=float, default=0.8, help="row offset from its product (larger: harder)")
  parser.add_argument("--leaves", type=str, default="", help="leaves searched in the sweep, e.g. 8,16,32")
  parser.add_argument("--reorders", type=str, default="40,100", help="reorder depths in the sweep")
  parser.add_argument("--num_leaves", type=int, default=0, help="tree leaves (0: round(sqrt(n)))")
  parser.add_argument("--training_sample", type=int, default=0, help="tree training points (0: min(n, 100k))")
  parser.add_argument("--soar_lambda", type=float, default=0.0, help="SOAR spilling (0: off; ScaNN suggests 1.5)")
  parser.add_argument("--spherical", action="store_true", help="spherical k-means tree")
  parser.add_argument("--target", type=float, default=0.95, help="recall@10 the chosen setting must reach")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="workdirs/benchmarks/retrieval_speed", help="folder for the PNG and JSON")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  k = args.k

  ((gallery, gallery_products), (queries, query_products)), seconds = timed(lambda: clustered_embeddings(
      args.n, args.queries, args.dim, categories=args.categories or max(2, args.n // 500),
      products=args.products or max(2, args.n // 20), spread=args.spread, seed=args.seed))
  print(f"data: gallery {gallery.shape}, queries {queries.shape} ({seconds:.1f} s)", flush=True)
  rows = []
  scann_search._scann_ops()  # pylint: disable=protected-access  (import outside the timed builds)

  # == Exact: JAX, tuned ==========================================================================
  batch, chunk = tune_exact_jax(gallery, queries, k)
  (_, exact_idx), seconds = timed(lambda: exact_search.exact_top_k(
      queries, gallery, k, gallery_chunk=chunk, query_batch=batch))
  rows.append({"method": f"exact JAX (batch {batch}, chunk {chunk})", "build s": 0.0,
               "queries/s": len(queries) / seconds, "recall@10": 1.0})
  print(f"exact JAX: {rows[-1]['queries/s']:.1f} queries/s", flush=True)
  # How good an "embedding" the data imitates: the share of each query's exact top 10 that are
  # rows of its own product (a perfect retrieval model: 1 wherever the product has 10 rows).
  same_product = float((gallery_products[exact_idx] == query_products[:, None]).mean())
  print(f"data: {same_product:.3f} of the exact top {k} share the query's product", flush=True)

  # == Exact: ScaNN brute force ===================================================================
  brute, build_s = timed(lambda: scann_search.ScannIndex.build(gallery, k=k, brute_force=True))
  (_, idx), seconds = timed(lambda: brute.search(queries, k, parallel=True))
  rows.append({"method": "exact ScaNN brute force", "build s": build_s, "queries/s": len(queries) / seconds,
               "recall@10": metrics.recall_against_exact(idx, exact_idx)})
  print(f"exact ScaNN: {rows[-1]['queries/s']:.1f} queries/s", flush=True)
  del brute
  exact_rows = list(rows)
  fastest_exact = max(r["queries/s"] for r in exact_rows)

  # == ScaNN tree + AH + reorder, as the project builds it ========================================
  index, build_s = timed(lambda: scann_search.ScannIndex.build(
      gallery, k=k, num_leaves=args.num_leaves or None, training_sample_size=args.training_sample or None,
      soar_lambda=args.soar_lambda or None, spherical=args.spherical))
  p = index.params
  (_, idx), seconds = timed(lambda: index.search(queries, k, parallel=True))
  rows.append({"method": f"ScaNN as built: {p['num_leaves']} leaves, search {p['num_leaves_to_search']}, "
                         f"reorder {p['reorder']}", "build s": build_s, "queries/s": len(queries) / seconds,
               "recall@10": metrics.recall_against_exact(idx, exact_idx)})
  print(f"ScaNN as built ({index.description}): {rows[-1]['queries/s']:.1f} queries/s, "
        f"recall@10 {rows[-1]['recall@10']:.3f}", flush=True)

  # == The recall/speed curve: search-time knobs on the same index ================================
  leaves = [int(x) for x in args.leaves.split(",")] if args.leaves else sorted(
      {max(1, round(p["num_leaves"] * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)})
  curve = []
  for reorder in (int(x) for x in args.reorders.split(",")):
    for n_leaves in leaves:
      index.search(queries[:256], k, leaves_to_search=n_leaves, reorder=reorder, parallel=True)  # warm
      (_, idx), seconds = timed(lambda: index.search(queries, k, leaves_to_search=n_leaves, reorder=reorder,
                                                     parallel=True))
      curve.append({"leaves": n_leaves, "reorder": reorder, "queries/s": len(queries) / seconds,
                    "recall@10": metrics.recall_against_exact(idx, exact_idx)})
      print(f"  sweep: leaves {n_leaves:4d} reorder {reorder:4d}: {curve[-1]['queries/s']:9.1f} queries/s, "
            f"recall@10 {curve[-1]['recall@10']:.3f}", flush=True)
  good = [c for c in curve if c["recall@10"] >= args.target]
  if good:
    best = max(good, key=lambda c: c["queries/s"])
    rows.append({"method": f"ScaNN best >= {args.target}: search {best['leaves']}, reorder {best['reorder']}",
                 "build s": build_s, "queries/s": best["queries/s"], "recall@10": best["recall@10"]})
  for row in rows:
    row["vs fastest exact"] = f"{row['queries/s'] / fastest_exact:.1f}x"

  print(f"\n{args.n:,} x {args.dim} gallery, {len(queries):,} queries, k={k}, {os.cpu_count()} CPU cores; "
        f"{same_product:.2f} of the exact top {k} are the query's product:")
  table = print_table(rows, ["method", "build s", "queries/s", "recall@10", "vs fastest exact"])
  if good:
    verdict = (f"target (recall@10 >= {args.target} at >= 10x the fastest exact): "
               f"{'met' if best['queries/s'] >= 10 * fastest_exact else 'missed'} "
               f"({best['queries/s'] / fastest_exact:.1f}x at recall {best['recall@10']:.3f})")
  else:
    verdict = f"target missed: no swept setting reached recall@10 {args.target}"
  print(verdict)
  png = os.path.join(args.out, "recall_vs_speed.png")
  plot_curve(curve, exact_rows, png, args.target)
  with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"args": vars(args), "same_product_in_exact_top_k": same_product, "rows": rows, "curve": curve,
               "table": table, "verdict": verdict}, f, indent=1)
  print(f"curve: {png}\nresults: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
  main()
