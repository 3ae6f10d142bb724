r"""How governance's time and memory grow with the catalogue: per step, per runner, with exponents.

  .venv/bin/python benchmarks/governance_scale.py                                  # 10k, 40k, 160k rows
  .venv/bin/python benchmarks/governance_scale.py --sizes=10000,40000 --runners=in_process,direct
  .venv/bin/python benchmarks/governance_scale.py --repo=/tmp/old --runners=in_process   # another checkout

Each (runner, size) is one fresh process running `--mode=govern` without records (govern.run) on a
built-in synthetic catalogue of about that many rows (generated once under --root, 32 px images)
with pixel features, so that featurization does not hide the rest. Runners: in_process (the
executor in this process), direct (Beam's DirectRunner), dask (Beam's DaskRunner on a
distributed.LocalCluster of 2 worker processes started by the child). Printed per size and step:
wall seconds and the growth exponent log(t2/t1)/log(n2/n1) against the previous size; then peak
RSS of the driver (the child) and of the Dask workers, the bytes the Beam executor staged (chunks
to and results from its staging folder) and shuffled (group_by_key's batches), duplicate recall on
the planted near duplicates, skipped dedupe buckets, and a paper row extrapolating the largest
size's per-item costs to 10^8 and 10^10 items.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def _child(args) -> None:
  sys.path.insert(0, args.repo)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from input_pipeline import synthetic_catalogue  # pylint: disable=g-import-not-at-top
  from oclear_jax import config_schema  # pylint: disable=g-import-not-at-top
  from oclear_jax.commands import govern  # pylint: disable=g-import-not-at-top
  from oclear_jax.governance import quality  # pylint: disable=g-import-not-at-top

  root = os.path.join(args.root, f"catalogue_{args.size}")
  spec = synthetic_catalogue.CatalogueSpec(num_products=max(2, round(args.size / 6.3)), image_size=32)
  synthetic_catalogue.generate_catalogue(root, spec, progress=False)
  config = config_schema.base_config()
  config.data.source, config.data.root = "csv", root
  config.governance.image_features = "pixels"
  cluster = None
  if args.runner == "in_process":
    config.governance.executor = "in_process"
  else:
    config.governance.executor = "beam"
    config.governance.beam_runner = "DirectRunner" if args.runner == "direct" else DASK_RUNNER
    if args.runner == "dask":
      from distributed import LocalCluster  # pylint: disable=g-import-not-at-top
      cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
      config.governance.beam_options = f"--dask_client_address={cluster.scheduler_address}"
  workdir = os.path.join(args.root, f"run_{args.runner}_{args.size}")
  if os.path.exists(workdir):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(workdir)
  start = time.perf_counter()
  out = govern.run(config, workdir, progress=False, write_records=False)
  total = time.perf_counter() - start
  counts = out["counts"]
  seconds = dict(getattr(out["result"], "seconds", {}))
  seconds["outputs and report"] = max(0.0, total - sum(seconds.values())) if seconds else total
  scores = quality.score_curation(out["result"].decisions, quality.read_truth(os.path.join(root, "ground_truth.csv")))
  worker_kb = []
  if cluster is not None:
    from distributed import Client  # pylint: disable=g-import-not-at-top
    with Client(cluster.scheduler_address) as client:
      worker_kb = list(client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).values())
    cluster.close()
  print("RESULT " + json.dumps({
      "rows": counts["rows"], "total": total, "seconds": seconds,
      "driver_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "worker_mb": max(worker_kb) / 1024 if worker_kb else None,
      "staged_bytes": out.get("staged_bytes", 0), "shuffle_bytes": out.get("shuffle_bytes", 0),
      "dup_recall": scores["duplicates"]["recall"], "dup_planted": scores["duplicates"]["planted"],
      "skipped_buckets": counts.get("duplicates", {}).get("skipped_buckets"),
      "categories": counts["categories_after"], "products_f1": scores["products"]["f1"],
      "wrong_label_f1": _f1(scores["wrong_labels"])}), flush=True)


def _f1(s) -> float:
  p, r = s["precision"], s["recall"]
  return 2 * p * r / (p + r) if p + r else 0.0


def _run(args, runner: str, size: int) -> dict | None:
  command = [sys.executable, os.path.abspath(__file__), "--child", f"--runner={runner}", f"--size={size}",
             f"--root={args.root}", f"--repo={args.repo}"]
  done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=args.timeout)
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  print(f"{runner} {size}: exit {done.returncode}\n{done.stderr[-3000:]}", file=sys.stderr)
  return None


def _exponent(a: float, b: float, n_a: int, n_b: int) -> str:
  return f"{math.log(b / a) / math.log(n_b / n_a):.2f}" if a > 0 and b > 0 else "–"


def _table(runner: str, results: list[dict]) -> None:
  steps = sorted({k for r in results for k in r["seconds"]}, key=lambda k: -results[-1]["seconds"].get(k, 0))
  header = ["step"] + [f"{r['rows']} rows s (exp)" for r in results]
  print(f"\n### {runner}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for step in steps + ["whole run"]:
    cells = [step]
    for k, r in enumerate(results):
      t = r["total"] if step == "whole run" else r["seconds"].get(step, 0.0)
      prev = None if k == 0 else (results[k - 1]["total"] if step == "whole run" else
                                   results[k - 1]["seconds"].get(step, 0.0))
      cells.append(f"{t:.1f}" + ("" if prev is None else f" ({_exponent(prev, t, results[k - 1]['rows'], r['rows'])})"))
    print("| " + " | ".join(cells) + " |")
  print("\n| rows | driver peak RSS MB | worker peak RSS MB | staged bytes/row | shuffle bytes/row | "
        "near-dup recall (planted) | skipped buckets | categories | product F1 | wrong-label F1 |\n"
        "|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    worker = f"{r['worker_mb']:.0f}" if r["worker_mb"] else "–"
    print(f"| {r['rows']} | {r['driver_mb']:.0f} | {worker} | {r['staged_bytes'] / r['rows']:.0f} | "
          f"{r.get('shuffle_bytes', 0) / r['rows']:.0f} | "
          f"{r['dup_recall']:.3f} ({r['dup_planted']}) | {r['skipped_buckets']} | {r['categories']} | "
          f"{r['products_f1']:.3f} | {r['wrong_label_f1']:.3f} |")
  if len(results) >= 2:
    a, b = results[-2], results[-1]
    per_row_s = b["total"] / b["rows"]
    per_row_bytes = max(0.0, (b["driver_mb"] - a["driver_mb"]) * 2 ** 20 / (b["rows"] - a["rows"]))
    print(f"\npaper row ({runner}, from the two largest sizes; driver bytes per row = RSS slope):\n\n"
          "| items | driver GB | staged GB | shuffle GB | core-hours |\n|---|---|---|---|---|")
    for n in (10 ** 8, 10 ** 10):
      cores = 2 if runner == "dask" else 1
      print(f"| 10^{round(math.log10(n))} | {per_row_bytes * n / 1e9:,.0f} | "
            f"{b['staged_bytes'] / b['rows'] * n / 1e9:,.0f} | "
            f"{b.get('shuffle_bytes', 0) / b['rows'] * n / 1e9:,.0f} | {per_row_s * n * cores / 3600:,.0f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="10000,40000,160000")
  parser.add_argument("--runners", default="in_process,direct,dask")
  parser.add_argument("--root", default=os.path.join(REPO, "workdirs", "governance_scale"))
  parser.add_argument("--repo", default=REPO, help="the checkout whose oclear_jax is measured")
  parser.add_argument("--timeout", type=int, default=7200)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--runner", default="in_process", help=argparse.SUPPRESS)
  parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.root, args.repo = os.path.abspath(args.root), os.path.abspath(args.repo)
  if args.child:
    _child(args)
    return
  sizes = [int(s) for s in args.sizes.split(",")]
  for runner in args.runners.split(","):
    results = [r for r in (_run(args, runner, n) for n in sizes) if r is not None]
    if results:
      _table(runner, results)


if __name__ == "__main__":
  main()
