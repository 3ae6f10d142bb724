r"""Command-line entry point.

  python -m oclear_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m oclear_jax.main --config=configs/tiny.py --workdir=/tmp/t --config.train.num_steps=100
  python -m oclear_jax.main --mode=prepare --config=configs/fashion.py --workdir=workdirs/fashion
  python -m oclear_jax.main --mode=govern --config=configs/demo.py --workdir=workdirs/demo
  python -m oclear_jax.main --mode=index --workdir=workdirs/demo [--config.index.target_recall=0.9]
  python -m oclear_jax.main --mode=search --workdir=workdirs/demo --query=photo.jpg [--query=...] \
      [--search.leaves=N --search.reorder=M]
  python -m oclear_jax.main --mode=embed --workdir=workdirs/demo --catalogue=DIR/meta.csv --output=OUT \
      [--config.data.columns.title=name ...]
  python -m oclear_jax.main ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I  # on each process
  python -m oclear_jax.distributed.launch --num_processes=2 --devices_per_process=4 -- --config=... --workdir=...  # locally

Modes, in the order data flows:
  govern   raw catalogue -> curated categories, decision log and report (oclear_jax.governance);
  prepare  catalogue -> records only;
  train    (default) prepare data, train or resume, evaluate, print the results table;
  index    embed the whole document gallery (the run's records, or --catalogue=CSV) with the run's
           checkpoint (the one selected on val, else the latest) and build the ScaNN index, tuned
           to config.index.target_recall (exact search for small galleries);
  search   embed query images and print their top-K documents, with a contact sheet
           (--search.leaves / --search.reorder: a one-off search depth);
  embed    embed every row of any catalogue CSV as a query and as a document into --output.
Rerunning `train` resumes from the latest checkpoint in --workdir. On SIGTERM (a preemption), `train`
saves the step in flight, prints one `preempted: ...` line and exits with code 75 (EX_TEMPFAIL):
rerun the same command to resume from that step (oclear_jax/distributed/preemption.py). `index`, `search` and `embed`
read the config the run saved in --workdir (config.json) unless --config is given; `--config.x=v`
overrides apply either way (without --config they are parsed here, see `split_config_overrides`:
absl's config_flags only accepts them after --config=FILE), and an unknown key fails naming it.
"""
from __future__ import annotations

import os
import re
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
_MODE = flags.DEFINE_enum("mode", "train", ["govern", "prepare", "train", "index", "search", "embed"],
                          "What to run.")
_QUERY = flags.DEFINE_multi_string("query", [], "search: query image file(s).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "search: documents to return per query.")
_OUTPUT_FORMAT = flags.DEFINE_enum("output_format", "table", ["table", "json"], "search: how to print results.")
# One-off search depth (absl accepts dotted flag names; `--config.*` stays the config's namespace).
_SEARCH_LEAVES = flags.DEFINE_integer("search.leaves", None, "search: tree leaves to probe for this search "
                                      "(default: the depth the index was tuned to).", lower_bound=1)
_SEARCH_REORDER = flags.DEFINE_integer("search.reorder", None, "search: candidates re-scored exactly for this "
                                       "search (default: the tuned depth).", lower_bound=1)
_CATALOGUE = flags.DEFINE_string("catalogue", None, "embed, index: a catalogue CSV (image paths relative to its "
                                 "folder); columns named by config.data.columns.")
_OUTPUT = flags.DEFINE_string("output", None, "embed: output folder for queries.npz, documents.npz, manifest.json.")
# Several processes (hosts) as one run: jax.distributed.initialize's arguments (oclear_jax/distributed/multihost.py).
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: join other processes when --coordinator_address/--num_processes/--process_id "
                                 "are given or JAX detects a cluster (TPU VM slice, SLURM, Open MPI), else run as "
                                 "one process; on: always call jax.distributed.initialize; off: never.")
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                           "HOST:PORT of process 0's coordinator, the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes the run has.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.", lower_bound=0)

# Modes that can run on the config a training run saved in --workdir.
SAVED_CONFIG_MODES = ("index", "search", "embed")
# `--config.x.y=v` overrides given without --config=FILE, taken out of argv by `run` (absl would
# refuse them as unknown flags) and applied to the saved config in `main`.
_SAVED_CONFIG_OVERRIDES: list[str] = []


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without `--config.*` overrides, the overrides) when argv has no --config=FILE; else (argv, [])."""
  if any(re.match(r"^--?config(=|$)", arg) for arg in argv):
    return argv, []  # config_flags parses its own overrides
  kept, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      kept.extend(argv[i:])
      break
    if re.match(r"^--?(no)?config\.", arg):
      overrides.append(arg)
      # `--config.x v`: the value is the next argument (a bare boolean `--config.flag` has none).
      if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        overrides.append(argv[i + 1])
        i += 1
    else:
      kept.append(arg)
    i += 1
  return kept, overrides


def apply_config_overrides(config, overrides: list[str]):
  """Applies `--config.x.y=v` arguments to a locked ConfigDict with config_flags' own parsing."""
  if not overrides:
    return config
  for arg in overrides:  # name the whole key, as a locked ConfigDict does for --config=FILE
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    node, key = config, match.group(1) if match else ""
    for part in key.split(".") if match else ():
      if not hasattr(node, "keys") or part not in node:
        raise ValueError(f"unknown config key {key!r} ({arg}); every field is declared in "
                         f"oclear_jax/config_schema.py, the run's own settings are in its config.json")
      node = node[part]
  values = flags.FlagValues()
  argv = ["main", *overrides]
  try:
    # DEFINE_config_dict defines one flag per override it finds in sys_argv; parsing them sets the
    # fields, typed as config_flags types them (tuples, bools, None-able fields).
    config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=True, sys_argv=argv)
    rest = values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError) as e:
    raise ValueError(f"bad config override among {' '.join(overrides)}: {e}") from e
  if len(rest) > 1:
    raise ValueError(f"unexpected argument {rest[1]!r} among the --config.* overrides; write --config.x=value")
  return config


def results_table(history: dict[int, dict[str, float]], ks=(1, 5, 10), *,
                  frozen: dict[str, float] | None = None, selected_step: int | None = None) -> str:
  """A plain-text table: the frozen pretrained tower (eval/frozen.json), untrained (step 0), trained.

  `selected_step` marks the step `config.eval.select_on` chose (eval/best.json). Where the eval
  re-ranked by title feedback (`eval.title_feedback_docs`), each row is followed by its prf/ row.
  """
  columns = [f"Recall@{k}" for k in ks] + ["mAP@R", "ScaNN R@10 vs exact"]
  rows = []
  named = ([("frozen pretrained (pooled, cosine)", frozen)] if frozen else []) + [
      ("untrained (step 0)" if step == 0 else
       f"trained (step {step}{', selected on val' if step == selected_step else ''})", history[step])
      for step in sorted(history)]
  with_feedback = []
  for name, m in named:
    with_feedback.append((name, m))
    if "prf/map@r" in m:
      with_feedback.append(("  + title feedback re-ranking", {k[len("prf/"):]: v for k, v in m.items()
                                                              if k.startswith("prf/")}))
  for name, m in with_feedback:
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
  if _WORKDIR.value is None or (_CONFIG.value is None and _MODE.value not in SAVED_CONFIG_MODES):
    raise app.UsageError("--config and --workdir are required, e.g. --config=configs/demo.py --workdir=workdirs/demo")
  if _SAVED_CONFIG_OVERRIDES and _MODE.value not in SAVED_CONFIG_MODES:
    raise app.UsageError(f"{_SAVED_CONFIG_OVERRIDES[0]} needs --config=FILE in --mode={_MODE.value}")
  # Imports after flag parsing: they load jax and TensorFlow.
  from oclear_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from oclear_jax.distributed import multihost  # pylint: disable=g-import-not-at-top
  from input_pipeline import paths  # pylint: disable=g-import-not-at-top
  from oclear_jax.distributed import preemption  # pylint: disable=g-import-not-at-top

  config, workdir = _CONFIG.value, paths.resolve(_WORKDIR.value)  # gs://bucket/run stays a URL
  try:
    multihost.initialize_distributed(_DISTRIBUTED.value, coordinator_address=_COORDINATOR_ADDRESS.value,
                                     num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    if config is None:  # a mode of SAVED_CONFIG_MODES on the run's own config
      from oclear_jax.serving import trained_run  # pylint: disable=g-import-not-at-top
      config = apply_config_overrides(trained_run.load_run_config(workdir), _SAVED_CONFIG_OVERRIDES)
    _MODES[_MODE.value](config, workdir)
  except preemption.Preempted as e:  # saved and stopped on SIGTERM: not an error, a run to resume
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.IncompatibleCheckpointError) as e:
    # User-facing problems (config, catalogue, workdir, query files) end with one clear line, not a traceback.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _govern(config, workdir):
  from oclear_jax.distributed import multihost  # pylint: disable=g-import-not-at-top
  from oclear_jax.commands import govern  # pylint: disable=g-import-not-at-top
  # One process governs (it writes the shared governance/ files and uses no device); its outcome
  # reaches every process, which then all join the records step (a collective of its own).
  multihost.run_on_process_zero(govern.run, config, workdir, write_records=False)
  govern.write_curated_records(config, workdir)


def _prepare(config, workdir):
  from oclear_jax import run_data  # pylint: disable=g-import-not-at-top
  prepared = run_data.prepare_data(config.data, workdir, seed=config.seed)
  print(f"records: {prepared.records_dir}\n{prepared.summary}")


def _train(config, workdir):
  from oclear_jax import run_data  # pylint: disable=g-import-not-at-top
  from oclear_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from input_pipeline import paths  # pylint: disable=g-import-not-at-top
  if config.data.governed and not paths.exists(run_data.governed_catalogue_path(workdir)):
    # One command from a raw catalogue to a trained model: govern first (what --mode=govern does).
    print(f"{run_data.governed_catalogue_path(workdir)} does not exist: governing the catalogue first")
    _govern(config, workdir)
  result = trainer.train_and_evaluate(config, workdir)
  selected = (result.get("best") or {}).get("step")
  history = {s: m for s, m in result["eval"].items() if s in (0, result["final_step"], selected)}
  ks = tuple(k for k in config.eval.ks if k in (1, 5, 10))
  print("\nImage queries -> image+title documents (held-out products, exact search):")
  print(results_table(history, ks, frozen=result.get("frozen"), selected_step=selected))
  print(f"\nEverything is under {workdir}: config.json, metrics.jsonl, tensorboard/, checkpoints/, eval/, "
        f"recall_at_k.png, contact_sheet.png, scann_index/")


def _index(config, workdir):
  from oclear_jax.commands import search as search_command  # pylint: disable=g-import-not-at-top
  search_command.build_index(workdir, config=config, catalogue=_CATALOGUE.value)


def _search(config, workdir):
  from oclear_jax.commands import search as search_command  # pylint: disable=g-import-not-at-top
  if not _QUERY.value:
    raise app.UsageError("--mode=search needs at least one --query=IMAGE")
  search_command.search(workdir, _QUERY.value, top_k=_TOP_K.value, output_format=_OUTPUT_FORMAT.value,
                        config=config, leaves_to_search=_SEARCH_LEAVES.value, reorder=_SEARCH_REORDER.value)


def _embed(config, workdir):
  from oclear_jax.commands import embed as embed_command  # pylint: disable=g-import-not-at-top
  if not _CATALOGUE.value or not _OUTPUT.value:
    raise app.UsageError("--mode=embed needs --catalogue=DIR/meta.csv and --output=FOLDER")
  embed_command.run(config, workdir, _CATALOGUE.value, _OUTPUT.value)


_MODES = {"govern": _govern, "prepare": _prepare, "train": _train, "index": _index, "search": _search,
          "embed": _embed}


def run():
  argv, overrides = split_config_overrides(sys.argv)
  _SAVED_CONFIG_OVERRIDES[:] = overrides
  app.run(main, argv=argv)


if __name__ == "__main__":
  sys.exit(run())
