r"""How well governance finds planted noise, against Confident Learning, and what it does for training.

  .venv/bin/python benchmarks/governance_quality.py                      # both datasets, 2 seeds: ~32 min on 2 cores
  .venv/bin/python benchmarks/governance_quality.py --datasets=builtin --steps=300
  .venv/bin/python benchmarks/governance_quality.py --skip_training      # detection tables only

Datasets:
  builtin  the built-in catalogue at config_schema's default noise (300 products; 5% wrong labels,
           5% of products under two ids, near duplicates, empty titles), its own ground truth;
  builtin20  the same with 20% wrong labels, fashion's level (not in the default --datasets);
  fashion  ../shared/data/fashion_small12k (skipped when absent) with noise planted into its train
           split (oclear_jax/governance/planted_noise.py): 20% wrong labels (drawn from the label
           distribution), 10% of classes split in two. Label granularity: articleType, the categories
           configs/fashion.py trains on; its "products" are therefore articleTypes, broad by design,
           so this run sets governance.split_min_effect=2 (their visual sub-modes reach ~1; splitting
           them would be right for product retrieval and wrong against articleType ground truth).
Governance uses EfficientNet-Lite0 ImageNet features (64 px on builtin, 96 px on fashion) plus
title TF-IDF. Reference: cleanlab's find_label_issues on 5-fold out-of-fold probabilities of a
logistic regression trained on the same features (governance's reduced image+title blocks).
Downstream: the same model and budget trained on raw vs governed categories, the latter with its
class-balanced sampling (n ** -0.5) and without it, evaluated by mAP@R on the untouched,
class-disjoint eval split.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import demo as demo_config  # noqa: E402
from configs import fashion as fashion_config  # noqa: E402
from input_pipeline import catalogue as catalogue_lib  # noqa: E402
from oclear_jax.commands import govern  # noqa: E402
from oclear_jax.governance import planted_noise  # noqa: E402
from oclear_jax.governance import quality  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def confident_learning(result, raw_label: dict[str, str], truth: dict[str, dict[str, str]]) -> dict[str, float]:
  """cleanlab.find_label_issues on out-of-fold logistic-regression probabilities of governance's features.

  Two classifiers are tried, on raw and on standardised features (each wins on one dataset); the
  reference is the one with the better F1 of detection, so the peer gets its best shot.
  """
  import cleanlab  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import StratifiedKFold, cross_val_predict  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  ids, rows = result.features["ids"], result.features["rows"]
  features = np.concatenate([block[rows] for block in result.features["blocks"]], axis=1)
  _, y = np.unique([raw_label[i] for i in ids], return_inverse=True)
  planted = {i for i in ids if "wrong_label" in truth[i]["noise"]}
  best = None
  for name, model in (("raw features", LogisticRegression(max_iter=500)),
                      ("standardised", make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)))):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Classes with fewer members than folds: expected on a long tail.
      probabilities = cross_val_predict(model, features, y, method="predict_proba",
                                        cv=StratifiedKFold(5, shuffle=True, random_state=0))
      issues = cleanlab.filter.find_label_issues(y, probabilities)
    scores = quality.detection_scores({ids[k] for k in np.flatnonzero(issues)}, planted)
    scores["classifier"] = f"logistic regression, {name}"
    f1 = 2 * scores["precision"] * scores["recall"] / max(scores["precision"] + scores["recall"], 1e-12)
    if best is None or f1 > best[0]:
      best = (f1, scores)
  return best[1]


def train(config, workdir: str, seeds: int) -> dict[str, float]:
  """mAP@R and R@1 of `seeds` trainings (config.seed = 0, 1, ...): their mean and max-min spread."""
  from oclear_jax.train import trainer  # pylint: disable=g-import-not-at-top
  runs = []
  for seed in range(seeds):
    for stale in ("checkpoints", "eval"):  # Never resume an earlier run.
      shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    config.seed = seed  # Init and batch order; both catalogues carry their split, so it stays put.
    out = trainer.train_and_evaluate(config, workdir, progress=False)
    metrics = out["eval"][out["final_step"]]
    runs.append({"map@r": float(metrics["map@r"]), "recall@1": float(metrics["recall@1"])})
  result = {"steps": out["final_step"], "seeds": seeds, "runs": runs}
  for key in ("map@r", "recall@1"):
    values = [r[key] for r in runs]
    result[key], result[f"{key} spread"] = float(np.mean(values)), float(np.ptp(values))
  return result


def _training_config(config, steps: int):
  config.train.num_steps = steps
  config.train.checkpoint_every = steps
  config.train.log_every = max(1, steps // 10)
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
  config.eval.at_start = False
  config.eval.scann = False
  config.eval.contact_sheet_queries = 0
  return config


def run_dataset(name: str, config, workdir: str, truth_fn, args) -> dict:
  governed_dir, raw_dir = os.path.join(workdir, "governed"), os.path.join(workdir, "raw")
  start = time.time()
  out = govern.run(config, governed_dir, progress=True, write_records=not args.skip_training)
  seconds = time.time() - start
  result = out["result"]
  truth = truth_fn(governed_dir)
  scores = quality.score_curation(result.decisions, truth)
  raw_label = {d.id: d.raw_label for d in result.decisions}
  print(f"[{name}] governance took {seconds:.0f} s; cleanlab reference ...", flush=True)
  scores["cleanlab"] = confident_learning(result, raw_label, truth)
  scores["governance_seconds"] = seconds
  scores["categories"] = {"raw": result.counts["labels_before"], "governed": result.counts["categories_after"]}
  if not args.skip_training:
    steps = args.fashion_steps if name == "fashion" else args.steps
    print(f"[{name}] training raw and governed, {steps} steps x {args.seeds} seed(s) each ...", flush=True)
    raw_config = _training_config(config.copy_and_resolve_references(), steps)
    governed_config = _training_config(config.copy_and_resolve_references(), steps)
    governed_config.data.governed = True
    uniform_config = governed_config.copy_and_resolve_references()
    uniform_config.data.balanced_sampling = False
    uniform_dir = os.path.join(workdir, "governed_uniform")
    os.makedirs(uniform_dir, exist_ok=True)  # Same curated catalogue, its own records and checkpoints.
    shutil.copytree(os.path.join(governed_dir, "governance"), os.path.join(uniform_dir, "governance"),
                    dirs_exist_ok=True)
    scores["downstream"] = {"raw": train(raw_config, raw_dir, args.seeds),
                            "governed, balanced sampling": train(governed_config, governed_dir, args.seeds),
                            "governed, uniform sampling": train(uniform_config, uniform_dir, args.seeds)}
  return scores


def builtin_config(args, wrong_label_fraction: float | None = None):
  config = demo_config.get_config()
  if wrong_label_fraction is not None:
    config.data.synthetic.wrong_label_fraction = wrong_label_fraction
  config.governance.image_features = args.image_features
  config.governance.image_size = 64
  return config


def fashion_setup(args, workdir: str):
  """Plants noise into the Myntra sample's train split; returns the config reading the noisy copy."""
  config = fashion_config.get_config()
  meta = os.path.join(config.data.root, config.data.csv)
  columns = catalogue_lib.CatalogueColumns(**{k: (v or None) for k, v in config.data.columns.to_dict().items()})
  read = catalogue_lib.read_catalogue(meta, columns, eval_fraction=config.data.eval_fraction, split_seed=config.seed,
                                      max_rows=args.fashion_rows or None)
  rows, truth = planted_noise.plant_label_noise(read.rows, wrong_fraction=0.2, split_fraction=0.1, seed=0)
  root = os.path.join(workdir, "noisy_catalogue")
  planted_noise.write_catalogue(root, rows, truth)
  config.data.root = root
  config.data.csv = "catalogue.csv"
  config.data.columns.update(dict(id="id", image="image", title="title", label="label", kind="kind", split="split"))
  config.governance.image_features = args.image_features
  config.governance.image_size = 96
  config.governance.split_min_effect = 2.0
  config.governance.feature_cache = os.path.join(args.workdir, "feature_cache")
  return config, truth


def _row(cells, widths):
  return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def print_tables(results: dict) -> None:
  widths = (34, 9, 9, 9, 9, 9)
  print("\nWrong-label detection and recovered products (pairwise over governed train documents)")
  print(_row(("dataset / method", "wrong P", "wrong R", "pair P", "pair R", "pair F1"), widths))
  for name, s in results.items():
    p, raw, w, cl = s["products"], s["raw_products"], s["wrong_labels"], s["cleanlab"]
    print(_row((f"{name} / raw labels", "-", "-", f"{raw['precision']:.3f}", f"{raw['recall']:.3f}",
                f"{raw['f1']:.3f}"), widths))
    print(_row((f"{name} / governance", f"{w['precision']:.3f}", f"{w['recall']:.3f}", f"{p['precision']:.3f}",
                f"{p['recall']:.3f}", f"{p['f1']:.3f}"), widths))
    print(_row((f"{name} / cleanlab (same features)", f"{cl['precision']:.3f}", f"{cl['recall']:.3f}", "-", "-", "-"),
               widths) + f"   [{cl['classifier']}]")
    d = s["duplicates"]
    dup = (f"P {d['precision']:.2f} R {d['recall']:.2f} against {d['planted']} planted" if d["planted"] else
           "none planted")
    print(f"   ({name}: {w['planted']} planted wrong labels, {w['flagged']} flagged by governance, "
          f"{cl['flagged']} by cleanlab; {d['dropped']} duplicates dropped, {dup}; categories "
          f"{s['categories']['raw']} -> {s['categories']['governed']}; governance {s['governance_seconds']:.0f} s)")
  if any("downstream" in s for s in results.values()):
    print(f"\nDownstream: same model and budget, raw vs governed categories (eval split untouched); mean over "
          f"seeds, +- the max-min spread")
    widths = (42, 16, 16, 7, 6)
    print(_row(("dataset / training categories", "mAP@R", "R@1", "steps", "seeds"), widths))
    for name, s in results.items():
      for kind, m in s.get("downstream", {}).items():
        print(_row((f"{name} / {kind}", f"{m['map@r']:.4f} +-{m['map@r spread']:.4f}",
                    f"{m['recall@1']:.4f} +-{m['recall@1 spread']:.4f}", m["steps"], m["seeds"]), widths))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", default="builtin,fashion")
  parser.add_argument("--workdir", default=os.path.join(HERE, "..", "workdirs", "governance_quality"))
  parser.add_argument("--image_features", default="efficientnet_lite0", choices=("efficientnet_lite0", "pixels"))
  parser.add_argument("--steps", type=int, default=300, help="training steps per builtin run")
  parser.add_argument("--fashion_steps", type=int, default=300, help="training steps per fashion run")
  parser.add_argument("--fashion_rows", type=int, default=0, help="0 = all rows of the Myntra sample")
  parser.add_argument("--seeds", type=int, default=2, help="trainings per arm (config.seed = 0, 1, ...)")
  parser.add_argument("--skip_training", action="store_true")
  args = parser.parse_args()
  args.workdir = os.path.abspath(args.workdir)
  results = {}
  for name in args.datasets.split(","):
    workdir = os.path.join(args.workdir, name)
    if name in ("builtin", "builtin20"):
      truth_fn = lambda d: quality.read_truth(os.path.join(d, "catalogue", "ground_truth.csv"))
      config = builtin_config(args, 0.2 if name == "builtin20" else None)
      results[name] = run_dataset(name, config, workdir, truth_fn, args)
    elif name == "fashion":
      if not os.path.exists(os.path.join(fashion_config.DEFAULT_ROOT, "meta.csv")):
        print(f"[fashion] skipped: {fashion_config.DEFAULT_ROOT}/meta.csv not found")
        continue
      config, truth = fashion_setup(args, workdir)
      results[name] = run_dataset(name, config, workdir, lambda d, t=truth: t, args)
    else:
      raise SystemExit(f"unknown dataset {name!r}; use builtin, builtin20 and/or fashion")
    with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
    print_tables({name: results[name]})
  print_tables(results)
  print(f"\nresults: {os.path.join(args.workdir, 'results.json')}")


if __name__ == "__main__":
  main()
