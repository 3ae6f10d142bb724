r"""Command-line entry point.

  python -m oclear_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m oclear_jax.main --config=configs/tiny.py --workdir=/tmp/t --config.train.num_steps=100
  python -m oclear_jax.main --mode=prepare --config=configs/fashion.py --workdir=workdirs/fashion
  python -m oclear_jax.main --mode=govern --config=configs/demo.py --workdir=workdirs/demo
  python -m oclear_jax.main --mode=index --workdir=workdirs/demo
  python -m oclear_jax.main --mode=search --workdir=workdirs/demo --query=photo.jpg [--query=...]

Modes, in the order data flows:
  govern   raw catalogue -> curated categories, decision log and report (oclear_jax.governance);
  prepare  catalogue -> records only;
  train    (default) prepare data, train or resume, evaluate, print the results table;
  index    embed the whole document gallery with the latest checkpoint and build the ScaNN index;
  search   embed query images and print their top-K documents, with a contact sheet.
Rerunning `train` resumes from the latest checkpoint in --workdir. `index` and `search` read the
config the run saved in --workdir unless --config is given.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for records, checkpoints, metrics and plots.")
_MODE = flags.DEFINE_enum("mode", "train", ["govern", "prepare", "train", "index", "search"], "What to run.")
_QUERY = flags.DEFINE_multi_string("query", [], "search: query image file(s).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "search: documents to return per query.")
_OUTPUT_FORMAT = flags.DEFINE_enum("output_format", "table", ["table", "json"], "search: how to print results.")


def results_table(history: dict[int, dict[str, float]], ks=(1, 5, 10)) -> str:
  """A plain-text table: untrained (step 0) vs trained (last step)."""
  columns = [f"Recall@{k}" for k in ks] + ["mAP@R", "ScaNN R@10 vs exact"]
  rows = []
  for step in sorted(history):
    m = history[step]
    name = "untrained (step 0)" if step == 0 else f"trained (step {step})"
    values = [m.get(f"recall@{k}", float("nan")) for k in ks] + [m.get("map@r", float("nan")),
                                                                 m.get("scann/recall_vs_exact@10", float("nan"))]
    rows.append([name] + [f"{v:.3f}" for v in values])
  header = ["model"] + columns
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # progress lines are printed; library INFO chatter is not
    logging.set_verbosity(logging.WARNING)
  if _WORKDIR.value is None or (_CONFIG.value is None and _MODE.value not in ("index", "search")):
    raise app.UsageError("--config and --workdir are required, e.g. --config=configs/demo.py --workdir=workdirs/demo")
  # Imports after flag parsing: they load jax and TensorFlow.
  from oclear_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from oclear_jax import sharding  # pylint: disable=g-import-not-at-top

  sharding.maybe_initialize_distributed()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  try:
    _MODES[_MODE.value](config, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.IncompatibleCheckpointError) as e:
    # User-facing problems (config, catalogue, workdir, query files) end with one clear line, not a traceback.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _govern(config, workdir):
  from oclear_jax.governance import command  # pylint: disable=g-import-not-at-top
  command.run(config, workdir)


def _prepare(config, workdir):
  from oclear_jax import datasets  # pylint: disable=g-import-not-at-top
  prepared = datasets.prepare_data(config.data, workdir, seed=config.seed)
  print(f"records: {prepared.records_dir}\n{prepared.summary}")


def _train(config, workdir):
  from oclear_jax import trainer  # pylint: disable=g-import-not-at-top
  result = trainer.train_and_evaluate(config, workdir)
  history = {s: m for s, m in result["eval"].items() if s in (0, result["final_step"])}
  ks = tuple(k for k in config.eval.ks if k in (1, 5, 10))
  print("\nImage queries -> image+title documents (held-out products, exact search):")
  print(results_table(history, ks))
  print(f"\nEverything is under {workdir}: config.json, metrics.jsonl, tensorboard/, checkpoints/, eval/, "
        f"recall_at_k.png, contact_sheet.png, scann_index/")


def _index(config, workdir):
  from oclear_jax.evaluators import search_command  # pylint: disable=g-import-not-at-top
  search_command.build_index(workdir, config=config)


def _search(config, workdir):
  from oclear_jax.evaluators import search_command  # pylint: disable=g-import-not-at-top
  if not _QUERY.value:
    raise app.UsageError("--mode=search needs at least one --query=IMAGE")
  search_command.search(workdir, _QUERY.value, top_k=_TOP_K.value, output_format=_OUTPUT_FORMAT.value,
                        config=config)


_MODES = {"govern": _govern, "prepare": _prepare, "train": _train, "index": _index, "search": _search}


def run():
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
