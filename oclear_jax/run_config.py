"""A run's config in its workdir: `config.json` (the first config) and `config_history.jsonl` (each resume's changes).

  config = run_config.load(workdir)            # the config in force: config.json + every recorded change
  changes = run_config.start(config, workdir)  # the trainer, before it writes anything else

A fresh run (no checkpoint in the workdir yet) writes `config.json`. A resume compares its config
with the one in force: a field outside `config_schema.RESUME_MAY_CHANGE` that differs (a width, the
classes, a tower, the data) refuses the resume before anything is written, naming every such field;
fields on that list (steps, learning rate, batch size, eval and index settings, the mesh) are
recorded as one line of `config_history.jsonl`, `{"step": S, "time": T, "changed": {key: [old, new]}}`,
S being the step the resume starts from, and `config.json` keeps the first config. So what a
workdir says about its run is true for every step, and readers (index, search, embed, evaluate)
load the config in force.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections

from input_pipeline import paths
from oclear_jax import config_schema
from oclear_jax.distributed import multihost

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"


class ConfigChangedError(ValueError):
  """A resume with a config that changes what the workdir's checkpoints mean; nothing was written."""


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _merge(node: ml_collections.ConfigDict, saved: dict, path: str, prefix: str) -> None:
  for key, value in saved.items():
    if key not in node:
      raise ValueError(f"{path}: unknown config key {prefix}{key} (saved by another version of oclear_jax?); "
                       f"pass --config=configs/...py with the run's settings instead")
    if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(node[key], value, path, f"{prefix}{key}.")
    else:
      node[key] = _as_tuples(value)  # JSON has lists where the config has tuples


def history(workdir: str) -> list[dict[str, Any]]:
  """The changes recorded at each resume, oldest first ([] for a run never resumed with another config)."""
  path = paths.join(workdir, HISTORY_FILE)
  if not paths.exists(path):
    return []
  with paths.open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config in force in `workdir`: config.json, then each recorded change, on today's defaults; locked."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} holds no training run; train first "
                            f"(--mode=train) or pass --config=configs/...py")
  try:
    with paths.open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); pass --config=configs/...py instead") from e
  config = config_schema.base_config()
  _merge(config, saved, path, "")
  for entry in history(workdir):
    for key, (_, new) in entry["changed"].items():
      _merge(config, _nest(key, new), paths.join(workdir, HISTORY_FILE), "")
  config_schema.validate(config)
  config.lock()
  return config


def _nest(dotted: str, value: Any) -> dict:
  out: Any = value
  for part in reversed(dotted.split(".")):
    out = {part: out}
  return out


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{dotted key: JSON value} of every leaf (as config.json stores them: lists for tuples)."""
  out = {}

  def walk(node: Any, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, (dict, ml_collections.ConfigDict)) and value:
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value
  walk(json.loads(config.to_json_best_effort()), "")
  return out


def differences(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict[str, list]:
  """{key: [old, new]} of every leaf that differs."""
  a, b = _flat(old), _flat(new)
  return {key: [a.get(key), b.get(key)] for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def may_change(key: str) -> bool:
  return any(key == field or key.startswith(field + ".") for field in config_schema.RESUME_MAY_CHANGE)


def has_checkpoint(workdir: str) -> bool:
  folder = paths.join(workdir, "checkpoints")
  return paths.isdir(folder) and any(name.rstrip("/").isdigit() for name in paths.listdir(folder))


def _resume_step(workdir: str) -> int:
  folder = paths.join(workdir, "checkpoints")
  return max(int(name.rstrip("/")) for name in paths.listdir(folder) if name.rstrip("/").isdigit())


def check(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list]:
  """The changes a run with `config` would record in `workdir` ({} for a fresh run); raises on a refused one."""
  if not has_checkpoint(workdir) or not paths.exists(paths.join(workdir, CONFIG_FILE)):
    return {}
  changed = differences(load(workdir), config)
  refused = {k: v for k, v in changed.items() if not may_change(k)}
  if refused:
    listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in refused.items())
    raise ConfigChangedError(
        f"{workdir} holds checkpoints of a run with another config, and these fields cannot change on resume: "
        f"{listed}. Nothing was written. Resume with the run's own values, or use a new --workdir (fields that "
        f"may change on resume: config_schema.RESUME_MAY_CHANGE)")
  return changed


def _write(config: ml_collections.ConfigDict, workdir: str, changed: dict[str, list]) -> None:
  if not has_checkpoint(workdir):  # nothing trained yet: this is the run's first config
    paths.write_bytes(paths.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2).encode())
    if paths.exists(paths.join(workdir, HISTORY_FILE)):
      paths.remove(paths.join(workdir, HISTORY_FILE))
  elif changed:
    entry = {"step": _resume_step(workdir), "time": time.time(), "changed": changed}
    lines = [json.dumps(e) for e in history(workdir)] + [json.dumps(entry)]
    paths.write_bytes(paths.join(workdir, HISTORY_FILE), ("\n".join(lines) + "\n").encode())


def start(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list]:
  """Checks `config` against the workdir (every process gets the same answer), then process 0 records it."""
  error, changed = None, {}
  if jax.process_index() == 0:
    try:
      changed = check(config, workdir)
    except ValueError as e:
      error = e
  multihost.raise_if_any_process_failed(error)
  multihost.run_on_process_zero(_write, config, workdir, changed)
  return changed


def describe(workdir: str) -> str:
  """One line naming the config in force (what the eval table and embed's manifest say)."""
  entries = history(workdir)
  if not entries:
    return f"config in force: {paths.join(workdir, CONFIG_FILE)}"
  changes = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)} from step {e['step']}"
                      for e in entries for k, (a, b) in e["changed"].items())
  return (f"config in force: {paths.join(workdir, CONFIG_FILE)} with the changes in "
          f"{paths.join(workdir, HISTORY_FILE)}: {changes}")
