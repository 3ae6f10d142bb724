r"""Command-line entry point.

  python -m oclear_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m oclear_jax.main --config=configs/tiny.py --workdir=/tmp/t --config.train.num_steps=100
  python -m oclear_jax.main --mode=prepare --config=configs/fashion.py --workdir=workdirs/fashion
  python -m oclear_jax.main --mode=govern --config=configs/demo.py --workdir=workdirs/demo
  python -m oclear_jax.main --mode=evaluate --workdir=workdirs/demo [--catalogue=DIR/meta.csv --split=all]
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
  evaluate the frozen towers and the run on a labelled catalogue (the run's own eval split, or
           --catalogue=CSV), each with title feedback: a table, evaluate.json, a contact sheet;
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
_MODE = flags.DEFINE_enum("mode", "train", ["govern", "prepare", "train", "evaluate", "index", "search", "embed"],
                          "What to run.")
_QUERY = flags.DEFINE_multi_string("query", [], "search: query image file(s), or a CSV of query images "
                                   "(column config.data.columns.image).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "search: documents to return per query.")
_OUTPUT_FORMAT = flags.DEFINE_enum("output_format", "table", ["table", "json"], "search: how to print results.")
# One-off search depth (absl accepts dotted flag names; `--config.*` stays the config's namespace).
_SEARCH_LEAVES = flags.DEFINE_integer("search.leaves", None, "search: tree leaves to probe for this search "
                                      "(default: the depth the index was tuned to).", lower_bound=1)
_SEARCH_REORDER = flags.DEFINE_integer("search.reorder", None, "search: candidates re-scored exactly for this "
                                       "search (default: the tuned depth).", lower_bound=1)
_CATALOGUE = flags.DEFINE_string("catalogue", None, "embed, index: a catalogue CSV (image paths relative to its "
                                 "folder); columns named by config.data.columns.")
_OUTPUT = flags.DEFINE_string("output", None, "embed: output folder for queries.npz, documents.npz, manifest.json; "
                              "evaluate: for evaluate.json and contact_sheet.png (default W/evaluate/NAME); "
                              "search: FILE.jsonl, one line of results per query.")
_SPLIT = flags.DEFINE_string("split", None, "evaluate: the rows of this split only (default: 'eval' of the run's "
                             "own catalogue, every row of --catalogue; 'all': every row).")
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
SAVED_CONFIG_MODES = ("evaluate", "index", "search", "embed")
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


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # progress lines are printed; library INFO chatter is not
    logging.set_verbosity(logging.WARNING)
  frozen_only = _MODE.value in ("evaluate", "embed") and _WORKDIR.value is None and _CONFIG.value is not None
  if not frozen_only and (_WORKDIR.value is None or (_CONFIG.value is None and _MODE.value not in SAVED_CONFIG_MODES)):
    raise app.UsageError("--config and --workdir are required, e.g. --config=configs/demo.py --workdir=workdirs/demo")
  if _SAVED_CONFIG_OVERRIDES and _MODE.value not in SAVED_CONFIG_MODES:
    raise app.UsageError(f"{_SAVED_CONFIG_OVERRIDES[0]} needs --config=FILE in --mode={_MODE.value}")
  if _MODE.value == "search" and not _QUERY.value:
    raise app.UsageError("--mode=search needs at least one --query=IMAGE")
  if _MODE.value == "embed" and (not _CATALOGUE.value or not _OUTPUT.value):
    raise app.UsageError("--mode=embed needs --catalogue=DIR/meta.csv and --output=FOLDER")
  # The one function-local import block: everything below loads jax and TensorFlow (seconds), which
  # a usage error or --help should not wait for.
  from input_pipeline import paths  # pylint: disable=g-import-not-at-top
  from oclear_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from oclear_jax.commands import embed, evaluate, govern, prepare, search, train  # pylint: disable=g-import-not-at-top
  from oclear_jax.distributed import multihost  # pylint: disable=g-import-not-at-top
  from oclear_jax.distributed import preemption  # pylint: disable=g-import-not-at-top
  from oclear_jax import run_config  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  workdir = None if frozen_only else paths.resolve(_WORKDIR.value)  # gs://bucket/run stays a URL
  try:
    multihost.initialize_distributed(_DISTRIBUTED.value, coordinator_address=_COORDINATOR_ADDRESS.value,
                                     num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    if config is None:  # a mode of SAVED_CONFIG_MODES on the run's own config
      config = apply_config_overrides(run_config.load(workdir), _SAVED_CONFIG_OVERRIDES)
    modes = {
        "govern": govern.run_mode,
        "prepare": prepare.run,
        "train": train.run,
        "index": lambda c, w: search.build_index(w, config=c, catalogue=_CATALOGUE.value),
        "search": lambda c, w: search.search(w, _QUERY.value, top_k=_TOP_K.value, output_format=_OUTPUT_FORMAT.value,
                                             config=c, leaves_to_search=_SEARCH_LEAVES.value,
                                             reorder=_SEARCH_REORDER.value, output=_OUTPUT.value),
        "embed": lambda c, w: embed.run(c, w, _CATALOGUE.value, _OUTPUT.value),
        "evaluate": lambda c, w: evaluate.run(c, w, _CATALOGUE.value, output=_OUTPUT.value, split=_SPLIT.value),
    }
    modes[_MODE.value](config, workdir)
  except preemption.Preempted as e:  # saved and stopped on SIGTERM or Ctrl-C: not an error, a run to resume
    _exit_now(str(e), preemption.PREEMPTED_EXIT_CODE)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (data, embedding, search): nothing half-written
    _exit_now("interrupted (Ctrl-C): stopped; nothing was left half-written (rerun the same command)", 130)
  except (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
          FloatingPointError, checkpoint.IncompatibleCheckpointError) as e:
    # User-facing problems (config, catalogue, workdir, query files) end with one clear line, not a traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _exit_now(line: str, code: int) -> None:
  """One line, then exit without the interpreter's teardown (tf.data's iterator threads can hang it)."""
  import jax  # pylint: disable=g-import-not-at-top  (already loaded by every mode that gets here)
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()  # the other processes' coordinator client, as an orderly exit would
  os._exit(code)  # pylint: disable=protected-access


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config file's problems (missing, syntax, unknown key, bad value) as one line.

  config_flags loads --config=FILE and applies its `--config.x=v` overrides while the flags are
  parsed, before `main`: its exceptions would otherwise end in a traceback of absl's frames.
  """
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:  # config_flags defers a failed load (a missing file) to the first use
      _CONFIG.value.keys()
    return rest
  except Exception as e:  # pylint: disable=broad-except  (whatever the config file raised: one line naming it)
    print(f"error: {_config_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


def _config_error(e: BaseException, argv: list[str]) -> str:
  config_file = next((a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)), None)
  cause = e
  while not isinstance(cause, SyntaxError) and (cause.__cause__ or cause.__context__) is not None:
    cause = cause.__cause__ or cause.__context__  # the config file's own exception
  if isinstance(cause, SyntaxError):
    return f"{cause.filename or config_file}:{cause.lineno}: syntax error: {cause.msg}"
  if config_file and not os.path.exists(config_file):
    return f"config file {config_file} not found"
  message = str(e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ").strip("'\" ")
  if isinstance(e, (AttributeError, KeyError)):
    name = re.search(r"([A-Za-z_][\w]*)", message)
    override = next((a for a in argv if name and re.match(rf"^--?(no)?config\.(\S*\.)?{name.group(1)}(=|$)", a)), None)
    hint = re.search(r'Did you mean "([\w.]+)"', message)
    return (f"unknown config key {name.group(1) if name else message!r} in {override or config_file}"
            f"{f' (did you mean {hint.group(1)}?)' if hint else ''}; every field is declared in "
            f"oclear_jax/config_schema.py")
  if isinstance(e, flags.Error):
    return message
  return f"{config_file}: {type(e).__name__}: {message}"


def run():
  argv, overrides = split_config_overrides(sys.argv)
  _SAVED_CONFIG_OVERRIDES[:] = overrides
  app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
  sys.exit(run())
