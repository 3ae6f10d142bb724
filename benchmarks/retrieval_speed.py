r"""Tune ScaNN to a recall target on any embeddings, against the fastest exact search in the same process.

  python benchmarks/retrieval_speed.py --embeddings=DB.npy [--queries=Q.npy] --target_recall=0.95
  python benchmarks/retrieval_speed.py                        # 1,000,000 x 256 generated, 2,000 queries
  python benchmarks/retrieval_speed.py --num_db=100000        # a quick run
  python benchmarks/retrieval_speed.py --seed=1 --clusters=8000 --noise=0.9 --spectrum=0.4  # an independent set

The autotuner is the one `--mode=index` uses (`oclear_jax/retrieval/index_tuning.py`): held-out queries,
exact top-10 as ground truth, search-time knobs swept on each build, build knobs (SOAR, leaves, AH dims per
block, training sample) by greedy search within `--budget_s` seconds of building, the fastest setting whose
recall on the held-out check half meets the target. With --embeddings (f32 [N, d] .npy, unit rows for
cosine) and no --queries, sampled documents query the gallery with themselves excluded, as `--mode=index`
does for a catalogue without query photos.

Without --embeddings the gallery is generated: unit vectors around `--clusters` centres (default n / 200,
so 5,000 at 1M) with Zipf-like cluster sizes. Real embeddings are anisotropic, so centres and offsets are
drawn with a decaying spectrum (`i ** -spectrum`: a few directions carry most of the variance, effective
dimension ~23 of 256 at 0.5), and each cluster has its own noise scale (`--noise` x U[0.7, 1.3]): some
products are photographed consistently, others not. Queries are fresh draws from the same clusters (a new
photo of a catalogued product), never copies of gallery rows. The run prints how much of each query's
exact top 10 is its own cluster and the mean cosine of its 1st and 10th neighbours, to judge the data.

Contenders, all timed in this process on the same held-out check queries:
  exact ScaNN  ScaNN's brute-force scorer, multi-threaded (`exact_search.fastest_exact_top_k` on CPU);
  exact JAX    `exact_search.exact_top_k` (jitted matmul + `lax.top_k`);
  ScaNN        every setting the tuner tried (the frontier table), and the chosen one.
The last line is `chosen: recall@10 R at Q q/s = X× the fastest exact (setting ...)`; the frontier is
written to --out as frontier.json / frontier.png, and results.json holds everything.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import text_table  # noqa: E402  (benchmarks/)

from oclear_jax.retrieval import exact_search  # noqa: E402
from oclear_jax.retrieval import index_tuning  # noqa: E402
from oclear_jax.retrieval import metrics  # noqa: E402
from oclear_jax.retrieval import scann_search  # noqa: E402


def clustered_embeddings(n, num_queries, dim, *, clusters, noise, spectrum, seed, chunk=100_000):
  """((gallery f32[n, dim], cluster int[n]), (queries f32[Q, dim], cluster int[Q])): see the module docstring."""
  rng = np.random.default_rng(seed)
  scale_by_dim = np.arange(1, dim + 1, dtype=np.float64) ** -spectrum
  scale_by_dim = (scale_by_dim / np.sqrt((scale_by_dim ** 2).sum())).astype(np.float32)  # E|offset|^2 = 1

  def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

  centres = unit(rng.standard_normal((clusters, dim), np.float32) * scale_by_dim)
  weights = rng.permutation(1.0 / np.arange(1, clusters + 1) ** 0.5)
  weights /= weights.sum()
  cluster_noise = (noise * rng.uniform(0.7, 1.3, clusters)).astype(np.float32)

  def draw(count):
    owners = rng.choice(clusters, count, p=weights)
    out = np.empty((count, dim), np.float32)
    for s in range(0, count, chunk):
      o = owners[s:s + chunk]
      offsets = rng.standard_normal((len(o), dim), np.float32) * scale_by_dim
      out[s:s + len(o)] = unit(centres[o] + cluster_noise[o, None] * offsets)
    return out, owners

  return draw(n), draw(num_queries)


def best_qps(search, num_queries, runs=3):
  best = float("inf")
  for _ in range(runs):
    start = time.perf_counter()
    out = search()
    best = min(best, time.perf_counter() - start)
  return out, num_queries / best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--embeddings", default="", help="gallery f32 [N, d] .npy (default: generate one)")
  parser.add_argument("--queries", default="", help="queries f32 [Q, d] .npy (default: generated, or sampled "
                      "documents with themselves excluded when --embeddings is given)")
  parser.add_argument("--num_db", type=int, default=1_000_000, help="generated gallery size")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--num_queries", type=int, default=2000, help="generated or sampled queries")
  parser.add_argument("--clusters", type=int, default=0, help="generated clusters (0: num_db / 200)")
  parser.add_argument("--noise", type=float, default=1.0, help="offset from the cluster centre (larger: harder)")
  parser.add_argument("--spectrum", type=float, default=0.5, help="decay of the per-dimension scale, i ** -x")
  parser.add_argument("--seed", type=int, default=0, help="generator seed")
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--target_recall", type=float, default=0.95)
  parser.add_argument("--budget_s", type=float, default=1800.0, help="seconds of index building for the tuner")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of the chosen setting")
  parser.add_argument("--out", default="workdirs/benchmarks/retrieval_speed", help="folder for frontier and results")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  k, started = args.k, time.perf_counter()
  scann_search._scann_ops()  # pylint: disable=protected-access  (TF import outside every timed step)

  # == Data =======================================================================================
  exclude, owners = None, None
  if args.embeddings:
    gallery = np.ascontiguousarray(np.load(args.embeddings, mmap_mode="r"), np.float32)
    if args.queries:
      queries = np.ascontiguousarray(np.load(args.queries), np.float32)
    else:
      rows = np.sort(np.random.default_rng(args.seed).choice(len(gallery), min(args.num_queries, len(gallery)),
                                                             replace=False))
      queries, exclude = gallery[rows], (rows, np.arange(len(gallery)))
    source = args.embeddings
  else:
    clusters = args.clusters or max(2, args.num_db // 200)
    (gallery, g_owner), (queries, q_owner) = clustered_embeddings(
        args.num_db, args.num_queries, args.dim, clusters=clusters, noise=args.noise, spectrum=args.spectrum,
        seed=args.seed)
    owners, source = (g_owner, q_owner), (f"generated: {clusters} clusters, noise {args.noise}, spectrum "
                                          f"i^-{args.spectrum}, seed {args.seed}")
  print(f"data: gallery {gallery.shape}, queries {queries.shape} ({source}); "
        f"{time.perf_counter() - started:.0f} s", flush=True)

  # == Exact: ScaNN brute force (the tuner's ground truth) and JAX on the same queries ============
  brute = scann_search.ScannIndex.build(gallery, k=k, brute_force=True)
  (_, exact_idx), scann_qps = best_qps(lambda: brute.search(queries, k, exclude=exclude, parallel=True),
                                       len(queries), runs=1)
  exact_search.exact_top_k(queries[:64], gallery[:131072], k, gallery_chunk=65536, query_batch=512)  # compile
  (_, jax_idx), jax_qps = best_qps(lambda: exact_search.exact_top_k(
      queries, gallery, k, gallery_chunk=65536, query_batch=512, exclude=exclude), len(queries), runs=1)
  agree = float((jax_idx == exact_idx).mean())
  print(f"exact: ScaNN brute force {scann_qps:,.0f} q/s, JAX {jax_qps:,.0f} q/s (same top-{k} ids: "
        f"{agree:.4f})", flush=True)
  if owners is not None:
    same = float((owners[0][exact_idx] == owners[1][:, None]).mean())
    cos = np.einsum("qd,qkd->qk", queries, gallery[exact_idx[:, [0, k - 1]]])
    print(f"data: {same:.3f} of the exact top {k} are the query's cluster; mean cosine of the 1st / {k}th "
          f"neighbour {cos[:, 0].mean():.3f} / {cos[:, 1].mean():.3f}", flush=True)

  # == The autotuner ==============================================================================
  tuned = index_tuning.tune(gallery, queries, k=k, target_recall=args.target_recall, build_budget_s=args.budget_s,
                            exclude=exclude, ground_truth=exact_idx)
  index_tuning.write_frontier(tuned, args.out)

  # == Final timing: the chosen setting and both exact methods, interleaved on the same check queries ==
  # Other jobs share the CPU and their load drifts over a long run: each round times exact ScaNN, exact
  # JAX and the chosen setting back to back, and the speedup is the median of the rounds' ratios.
  check_q = queries[1::2]
  check_ex = None if exclude is None else (exclude[0][1::2], exclude[1])
  rounds = []
  for _ in range(args.rounds):
    _, exact_scann = best_qps(lambda: brute.search(check_q, k, exclude=check_ex, parallel=True), len(check_q), 1)
    _, exact_jax = best_qps(lambda: exact_search.exact_top_k(check_q, gallery, k, gallery_chunk=65536,
                                                             query_batch=512, exclude=check_ex), len(check_q), 1)
    (_, idx), chosen = best_qps(lambda: tuned.index.search(check_q, k, exclude=check_ex, parallel=True),
                                len(check_q), 1)
    rounds.append((exact_scann, exact_jax, chosen, chosen / max(exact_scann, exact_jax)))
  chosen_recall = metrics.recall_against_exact(idx, exact_idx[1::2])
  scann_qps2, jax_qps2, chosen_qps, speedup = (float(np.median([r[i] for r in rounds])) for i in range(4))
  fastest = max(scann_qps2, jax_qps2)
  print("\nfinal timing, interleaved rounds (q/s): " + "; ".join(
      f"exact ScaNN {a:,.0f}, exact JAX {b:,.0f}, chosen {c:,.0f} = {r:.1f}x" for a, b, c, r in rounds))
  def cell(value, spec):
    return "" if value is None else format(value, spec)
  rows = [{"setting": r["setting"], "build s": cell(r["build_s"], ".0f"), f"tune R@{k}": cell(r[f"recall@{k}"], ".3f"),
           "tune q/s": cell(r["queries/s"], ",.0f"), f"check R@{k}": cell(r.get("check_recall"), ".3f"),
           "check q/s": cell(r.get("check_queries/s"), ",.0f"),
           "x exact alongside": cell(r.get("check_speedup"), ".1f"),
           "x fastest exact": cell(r.get("check_queries/s", r["queries/s"]) / fastest, ".1f")}
          for r in tuned.frontier]
  print(f"\nfrontier: {gallery.shape[0]:,} x {gallery.shape[1]}, {len(queries) // 2} tune + {len(check_q)} check "
        f"queries, {os.cpu_count()} CPU cores; fastest exact {fastest:,.0f} q/s (median of the final rounds: "
        f"ScaNN brute force {scann_qps2:,.0f}, JAX {jax_qps2:,.0f}; the x column divides by it)")
  text_table.print_table(rows, list(rows[0]))
  met = chosen_recall >= args.target_recall and speedup >= 10
  print(f"target (recall@{k} >= {args.target_recall} at >= 10x the fastest exact): {'met' if met else 'missed'}; "
        f"total {time.perf_counter() - started:.0f} s; frontier in {args.out}")
  line = (f"chosen: recall@{k} {chosen_recall:.3f} at {chosen_qps:,.0f} q/s = {speedup:.1f}× the fastest exact, "
          f"median of {len(rounds)} interleaved rounds "
          f"(setting {tuned.chosen['setting']})")
  with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"args": vars(args), "source": source, "exact": {"scann_qps": [scann_qps, scann_qps2],
               "jax_qps": [jax_qps, jax_qps2], "tuner_scann_qps": tuned.exact_qps}, "chosen": tuned.chosen,
               "final": {"recall": chosen_recall, "queries/s": chosen_qps, "speedup": speedup,
                         "rounds": rounds}, "frontier": rows,
               "line": line}, f, indent=1)
  print(line, flush=True)


if __name__ == "__main__":
  main()
