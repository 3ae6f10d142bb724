"""Tunes a ScaNN index to a recall target on the gallery's own embeddings (`config.index.target_recall`).

`tune(gallery, queries, target_recall=...)` returns the fastest searcher whose recall@k against
exact search meets the target, and every setting it tried (the recall/speed frontier):

1. Queries are the caller's held-out queries (`gallery_index`: real query photos where the run has
   them, else sampled documents searching the gallery with themselves excluded). They are split in
   two halves: settings are compared on the "tune" half and a candidate is confirmed, and reported,
   on the "check" half, so the recall recorded is not the best of many noisy measurements.
2. Ground truth is exact top-k (`exact_search.fastest_exact_top_k`). Exact search is itself a
   setting (recall 1, its measured queries/s): when nothing approximate meets the target faster,
   the index stays exact.
3. Search-time knobs first, on each built index: for each reorder depth, the leaves to search grow
   by sqrt(2) until the tune recall meets the target.
4. Then build knobs, by greedy coordinate search from the base build while the build-time budget
   lasts (`build_budget_s`, seconds spent building): SOAR spilling, leaves x2 and /2, AH dims per
   block, training sample x3. A move is kept when it gives a faster setting meeting the target (or,
   while none does, a higher recall); the next moves start from the best build.
5. The chosen setting is the fastest, relative to exact search timed right after it on the same queries (load
   from other jobs drifts over a run), whose check recall meets the target; its leaves to search and
   reorder depth are stored in the index's params, which every later search uses.

Speed is queries/s of multi-threaded batched search, the best of a few runs (other jobs share the
CPU). `write_frontier` saves frontier.json and frontier.png.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from input_pipeline import paths
from oclear_jax.retrieval import exact_search
from oclear_jax.retrieval import metrics as metrics_lib
from oclear_jax.retrieval import scann_search

BUILD_KEYS = ("num_leaves", "training_sample_size", "dims_per_block", "soar_lambda", "anisotropic_threshold",
              "spherical")
# Build moves in the order tried: (name, change, expected build time relative to the current build).
# Recall on clustered data is limited by the partition first (SOAR, leaves), then by the tree's training.
MOVES = (
    ("SOAR 1.5", lambda b, n: {"soar_lambda": 1.5} if not b["soar_lambda"] else None, 1.6),
    ("leaves x2", lambda b, n: {"num_leaves": b["num_leaves"] * 2} if b["num_leaves"] * 2 <= n // 20 else None,
     1.6),
    ("training sample x3", lambda b, n: ({"training_sample_size": min(n, b["training_sample_size"] * 3)}
                                         if b["training_sample_size"] < n else None), 2.0),
    ("AH 4 dims/block", lambda b, n: {"dims_per_block": 4} if b["dims_per_block"] == 2 else None, 0.8),
    ("leaves /2", lambda b, n: {"num_leaves": b["num_leaves"] // 2} if b["num_leaves"] >= 8 else None, 0.8),
    ("AH 1 dim/block", lambda b, n: {"dims_per_block": 1} if b["dims_per_block"] == 2 else None, 1.5),
)


@dataclasses.dataclass
class Tuned:
  index: scann_search.ScannIndex  # the chosen searcher, its search depth in `params`
  chosen: dict[str, Any]  # the chosen frontier row (check recall and queries/s)
  frontier: list[dict[str, Any]]  # every setting tried
  exact_qps: float | None  # None: exact search was not timed (tuning off)
  target_recall: float
  k: int


def _label(build: dict | None, leaves: int | None = None, reorder: int | None = None) -> str:
  if build is None:
    return "exact (brute force)"
  text = (f"{build['num_leaves']} leaves" + (f", SOAR {build['soar_lambda']}" if build["soar_lambda"] else "")
          + f", AH {build['dims_per_block']}, sample {build['training_sample_size']}")
  return text + (f"; search {leaves}, reorder {reorder}" if leaves else "")


def _split(queries, exclude):
  """(tune, check) halves: (queries, exclude ids or None) each; interleaved so both see every source."""
  def half(sl):
    return queries[sl], (None if exclude is None else (np.asarray(exclude[0])[sl], exclude[1]))
  if len(queries) < 2:
    return half(slice(None)), half(slice(None))
  return half(slice(0, None, 2)), half(slice(1, None, 2))


def _timed(search: Callable[[], tuple], num_queries: int, min_time_s: float) -> tuple[np.ndarray, float]:
  """(indices, queries/s): the best of up to 3 runs, stopping once min_time_s has been spent."""
  best, spent, runs, idx = math.inf, 0.0, 0, None
  while runs == 0 or (runs < 3 and spent < min_time_s):
    start = time.perf_counter()
    _, idx = search()
    took = time.perf_counter() - start
    best, spent, runs = min(best, took), spent + took, runs + 1
  return idx, num_queries / max(best, 1e-9)


def tune(gallery: np.ndarray, queries: np.ndarray, *, k: int = 10, target_recall: float = 0.95,
         build_budget_s: float = 600.0, base: dict | None = None, exclude=None, reorders=(40, 100, 250),
         min_time_s: float = 0.2, exact_is_candidate: bool = True, ground_truth: np.ndarray | None = None,
         progress: bool = True) -> Tuned:
  """The fastest index meeting `target_recall` (recall@k against exact) on held-out `queries`.

  Args:
    gallery: f32[N, d].
    queries: f32[Q, d] held-out queries (Q >= 2; a few hundred or more for a stable estimate).
    k: the recall depth.
    target_recall: recall@k the chosen setting must reach on both query halves.
    build_budget_s: seconds of index building the build-knob search may spend after the first build.
    base: `ScannIndex.build` keyword arguments of the first build (`params_from_config`); the tuner
      starts there and changes build knobs from there.
    exclude: optional ``(query_ids [Q], gallery_ids [N])``: a query's own document is not a result.
    reorders: reorder depths swept at each build.
    min_time_s: timing runs repeat (up to 3) until this long was spent; 0 times each setting once.
    exact_is_candidate: exact search counts as a setting (False forces an approximate choice).
    ground_truth: int[Q, >= k] exact top indices of `queries` if the caller has them.
    progress: print one line per setting to stderr.

  Returns:
    `Tuned`: the chosen index and the frontier of every setting tried.
  """
  log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
  gallery = np.ascontiguousarray(gallery, np.float32)
  queries = np.ascontiguousarray(queries, np.float32)
  n = gallery.shape[0]
  (tune_q, tune_ex), (check_q, check_ex) = _split(queries, exclude)
  brute = scann_search.ScannIndex.build(gallery, k=k, brute_force=True)
  if ground_truth is None:
    _, ground_truth = exact_search.fastest_exact_top_k(queries, gallery, k, exclude=exclude, searcher=brute)
  ground_truth = np.asarray(ground_truth)[:, :k]
  tune_gt, check_gt = (ground_truth, ground_truth) if len(queries) < 2 else (ground_truth[0::2], ground_truth[1::2])
  _, exact_qps = _timed(lambda: brute.search(check_q, k, exclude=check_ex, parallel=True), len(check_q), min_time_s)
  recall_key = f"recall@{k}"
  frontier = [{"setting": _label(None), "build": None, "leaves_to_search": None, "reorder": None, "build_s": 0.0,
               recall_key: 1.0, "queries/s": exact_qps, "check_recall": 1.0, "check_queries/s": exact_qps,
               "check_exact_queries/s": exact_qps, "check_speedup": 1.0}]
  log(f"tuning to recall@{k} >= {target_recall} on {len(tune_q)} + {len(check_q)} held-out queries; "
      f"exact: {exact_qps:,.0f} q/s")

  def build_and_sweep(build: dict, why: str):
    start = time.perf_counter()
    index = scann_search.ScannIndex.build(gallery, k=k, **{**(base or {}), **build, "exact_max_documents": 0})
    build_s = time.perf_counter() - start
    if index.params["mode"] == "brute_force":
      return index, [], build_s
    log(f"built {_label(build)} in {build_s:.1f} s ({why})")
    rows, start_leaves = [], 1
    num_leaves = index.params["num_leaves"]
    grid = sorted({max(1, min(num_leaves, round(num_leaves * 2 ** (-j / 2))))
                   for j in range(int(2 * math.log2(max(num_leaves, 1))) + 2)})
    for reorder in reorders:
      for leaves in (g for g in grid if g >= start_leaves):
        idx, qps = _timed(lambda: index.search(tune_q, k, exclude=tune_ex, leaves_to_search=leaves,
                                               reorder=reorder, parallel=True), len(tune_q), min_time_s)
        recall = metrics_lib.recall_against_exact(idx, tune_gt)
        rows.append({"setting": _label(build, leaves, reorder), "build": dict(build), "leaves_to_search": leaves,
                     "reorder": reorder, "build_s": build_s, recall_key: recall, "queries/s": qps})
        log(f"  search {leaves:5d} leaves, reorder {reorder:4d}: recall@{k} {recall:.3f} at {qps:9,.0f} q/s")
        if recall >= target_recall:
          start_leaves = max(1, leaves // 4)  # a deeper reorder needs at most as many leaves
          break
        same_depth = [r[recall_key] for r in rows if r["reorder"] == reorder]
        if len(same_depth) >= 3 and same_depth[-1] - same_depth[-3] < 0.002:
          break  # a plateau: this reorder depth (AH's error), not the leaves searched, limits recall
    # Confirm the fastest few meeting the target on the check half (this index is dropped later).
    for row in sorted((r for r in rows if r[recall_key] >= target_recall), key=lambda r: -r["queries/s"])[:3]:
      idx, qps = _timed(lambda: index.search(check_q, k, exclude=check_ex, leaves_to_search=row["leaves_to_search"],
                                             reorder=row["reorder"], parallel=True), len(check_q), min_time_s)
      # Exact search timed right after: other jobs' load drifts over a long tuning run, and the ratio
      # of two adjacent timings is what settings are compared (and the chosen one reported) by.
      _, exact_now = _timed(lambda: brute.search(check_q, k, exclude=check_ex, parallel=True), len(check_q),
                            min_time_s)
      row.update({"check_recall": metrics_lib.recall_against_exact(idx, check_gt), "check_queries/s": qps,
                  "check_exact_queries/s": exact_now, "check_speedup": qps / exact_now})
    return index, rows, build_s

  def key_of(build):  # leaves compared on a log scale: x2 after /2 is the build already tried
    return json.dumps({**build, "num_leaves": round(math.log2(build["num_leaves"]) * 4)}, sort_keys=True)

  def score(rows):  # (meets the target, speedup over adjacent exact search if it does, else the best tune recall)
    good = [r["check_speedup"] for r in rows if r.get("check_recall", 0.0) >= target_recall]
    return (True, max(good)) if good else (False, max([r[recall_key] for r in rows], default=0.0))

  resolvable = BUILD_KEYS + ("min_points_for_tree", "num_leaves_to_search", "reorder")
  first = scann_search._resolve_params(  # pylint: disable=protected-access
      n, k, **{key: v for key, v in (base or {}).items() if key in resolvable})
  best_index, best_build, best_score = None, None, (False, -1.0)
  if first["mode"] != "brute_force":
    best_build = {key: first[key] for key in BUILD_KEYS}
    best_index, rows, spent = build_and_sweep(best_build, "base build")
    frontier += rows
    best_score, tried = score(rows), {key_of(best_build)}
    improved = True
    while improved:
      improved = False
      for name, change, cost in MOVES:
        delta = change(best_build, n)
        build = {**best_build, **(delta or {})}
        key = key_of(build)
        if delta is None or key in tried:
          continue
        estimate = cost * max(r["build_s"] for r in frontier if r["build"] == best_build)
        if spent + estimate > build_budget_s:
          log(f"skipped {name}: about {estimate:.0f} s of build would exceed the budget "
              f"({spent:.0f} of {build_budget_s:.0f} s spent)")
          continue
        tried.add(key)
        index, rows, build_s = build_and_sweep(build, name)
        spent += build_s
        frontier += rows
        if score(rows) > best_score:
          best_index, best_build, best_score, improved = index, build, score(rows), True
          break  # the remaining moves start from the new best build
        del index
  candidates = [r for r in frontier if r.get("check_recall", 0.0) >= target_recall
                and (r["build"] is not None or exact_is_candidate or len(frontier) == 1)]
  if not candidates:  # nothing approximate met the target: the most accurate approximate setting
    candidates = [max((r for r in frontier if r["build"] is not None), key=lambda r: r[recall_key])]
    candidates[0].setdefault("check_recall", float("nan"))
  chosen = max(candidates, key=lambda r: (r.get("check_speedup", 0.0), r.get("check_recall", 0.0)))
  met = chosen.get("check_recall", 0.0) >= target_recall
  qps = chosen.get("check_queries/s", chosen["queries/s"])
  exact_near = chosen.get("check_exact_queries/s", exact_qps)
  why = (f"tuned to recall@{k} >= {target_recall}: {chosen['check_recall']:.3f} at {qps:,.0f} q/s "
         f"({qps / exact_near:.1f}x exact, timed alongside) on {len(check_q)} held-out queries" if met else
         f"target recall@{k} {target_recall} not met by any setting tried; best {chosen[recall_key]:.3f}")
  record = {"setting": chosen["setting"], "target_recall": target_recall, "met": met,
            recall_key: chosen["check_recall"], "queries/s": qps, "exact_queries/s": exact_near,
            "speedup_vs_exact": qps / exact_near, "queries": len(check_q), "why": why}
  if chosen["build"] is None:
    index = brute.with_search_params(tuned=record)
  else:
    if chosen["build"] != best_build:  # only the best build is kept in memory; rebuild the chosen one
      best_index = scann_search.ScannIndex.build(gallery, k=k, **{**(base or {}), **chosen["build"],
                                                                    "exact_max_documents": 0})
    index = best_index.with_search_params(leaves_to_search=chosen["leaves_to_search"], reorder=chosen["reorder"],
                                          tuned=record)
  log(f"chosen: {index.description}")
  return Tuned(index=index, chosen=record, frontier=frontier, exact_qps=exact_qps, target_recall=target_recall, k=k)


def single_setting(index: scann_search.ScannIndex, queries: np.ndarray, ground_truth: np.ndarray, *, k: int = 10,
                   target_recall: float = 0.0, exclude=None, why: str, min_time_s: float = 0.2) -> Tuned:
  """An index that is not tuned (exact by size, or tuning off), measured like a tuned one on the check half."""
  (_, _), (check_q, check_ex) = _split(np.ascontiguousarray(queries, np.float32), exclude)
  check_gt = np.asarray(ground_truth)[:, :k]
  check_gt = check_gt if len(queries) < 2 else check_gt[1::2]
  idx, qps = _timed(lambda: index.search(check_q, k, exclude=check_ex, parallel=True), len(check_q), min_time_s)
  recall = metrics_lib.recall_against_exact(idx, check_gt)
  exact = index.params["mode"] == "brute_force"
  p = index.params
  label = _label(None) if exact else _label({key: p.get(key) for key in BUILD_KEYS}, p["num_leaves_to_search"],
                                            p["reorder"])
  row = {"setting": label, "build": None if exact else {key: p.get(key) for key in BUILD_KEYS},
         "leaves_to_search": None if exact else p["num_leaves_to_search"], "reorder": None if exact else p["reorder"],
         "build_s": 0.0, f"recall@{k}": recall, "queries/s": qps, "check_recall": recall, "check_queries/s": qps}
  chosen = {"setting": label, "target_recall": target_recall, "met": recall >= target_recall,
            f"recall@{k}": recall, "queries/s": qps, "exact_queries/s": qps if exact else None,
            "speedup_vs_exact": 1.0 if exact else None, "queries": len(check_q), "why": why}
  return Tuned(index=index.with_search_params(tuned=chosen), chosen=chosen, frontier=[row],
               exact_qps=qps if exact else None, target_recall=target_recall, k=k)


def write_frontier(tuned: Tuned, directory: str) -> tuple[str, str]:
  """frontier.json (every setting tried, the chosen one) and frontier.png (recall against q/s) in
  directory, a local folder or a URL (both written as bytes through `input_pipeline.paths`)."""
  paths.makedirs(directory)
  json_path, png_path = paths.join(directory, "frontier.json"), paths.join(directory, "frontier.png")
  paths.write_bytes(json_path, json.dumps({
      "target_recall": tuned.target_recall, "k": tuned.k, "exact_queries/s": tuned.exact_qps,
      "chosen": tuned.chosen, "settings": tuned.frontier}, indent=1).encode("utf-8"))
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top  (plots only)
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (plots only)
  fig = Figure(figsize=(8, 5.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  recall_key = f"recall@{tuned.k}"
  builds = {}
  for row in tuned.frontier:
    if row["build"] is not None:
      builds.setdefault(_label(row["build"]), {}).setdefault(row["reorder"], []).append(row)
  for label, by_reorder in builds.items():
    line = None
    for reorder, rows in sorted(by_reorder.items()):
      rows = sorted(rows, key=lambda r: r["leaves_to_search"])
      line = ax.plot([r[recall_key] for r in rows], [r["queries/s"] for r in rows], marker="o", markersize=3,
                     color=None if line is None else line[0].get_color(), linewidth=1,
                     label=label if line is None else None)
  if tuned.exact_qps is not None:
    ax.axhline(tuned.exact_qps, linestyle="--", color="grey")
    ax.annotate("exact", (0.0, tuned.exact_qps), xycoords=("axes fraction", "data"), fontsize=8, xytext=(3, 3),
                textcoords="offset points")
  ax.axvline(tuned.target_recall, linestyle=":", color="red")
  ax.plot([tuned.chosen[recall_key]], [tuned.chosen["queries/s"]], marker="*", markersize=14, color="red",
          linestyle="none", label=f"chosen: {tuned.chosen['setting']}")
  ax.set_yscale("log")
  ax.set_xlabel(f"recall@{tuned.k} against exact search (tune queries; chosen: check queries)")
  ax.set_ylabel("queries / s (log scale)")
  ax.set_title(f"Settings tried for recall@{tuned.k} >= {tuned.target_recall}")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="lower left", fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  paths.write_bytes(png_path, png.getvalue())
  return json_path, png_path
