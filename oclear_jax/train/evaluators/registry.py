"""The trainer's evaluators, named in the config (big_vision's `config.evals`).

  config.evals.frozen = {"type": "frozen_row"}
  config.evals.eval = {"type": "retrieval"}
  config.evals.best = {"type": "checkpoint_selection"}

Each entry's `type` names a module of this package that defines `Evaluator`, a subclass of the
base below: adding an evaluator is one new file and one config entry. The trainer calls every
evaluator at the same moments, in config order, and returns each one's `result` under its name:

* `start(state, shardings, start_step)`: once, after restore and before the first step;
* `at_step(state, step)`: every `config.eval.every` steps (not the last one);
* `last(state, step)`: after the last step (not when a drill stops early);
* `close()`: always, also when training fails.

Evaluators get the task's predict functions (`OclearTask.jit_predict`, `jit_pooled`) and the input
source's embedded splits (`input_sources`), never the training loop's internals.
"""
from __future__ import annotations

import importlib
from typing import Any

import ml_collections

PACKAGE = "oclear_jax.train.evaluators"


class Evaluator:
  """No-op defaults: an evaluator overrides the moments it acts at."""

  def __init__(self, name: str, settings: ml_collections.ConfigDict, task, inputs, workdir: str, writer):
    self.name, self.settings, self.task, self.inputs, self.workdir, self.writer = (
        name, settings, task, inputs, workdir, writer)
    self.config = task.config
    self.result: Any = None

  def start(self, state, shardings, start_step: int) -> None:
    del state, shardings, start_step

  def at_step(self, state, step: int) -> None:
    del state, step

  def last(self, state, step: int) -> None:
    del state, step

  def close(self) -> None:
    pass


def evaluator_module(name: str, settings: ml_collections.ConfigDict):
  """The module `config.evals.<name>.type` names (the registry's one import by name)."""
  kind = settings.get("type", "")
  try:
    return importlib.import_module(f"{PACKAGE}.{kind}")
  except ModuleNotFoundError as e:
    if e.name != f"{PACKAGE}.{kind}":
      raise
    raise ValueError(f"config.evals.{name}.type={kind!r} is not an evaluator: use the name of a module of "
                     f"oclear_jax/train/evaluators/ that defines Evaluator (frozen_row, retrieval, "
                     f"checkpoint_selection, ...)") from e


def make_evaluators(config: ml_collections.ConfigDict, task, inputs, workdir: str, writer) -> list[Evaluator]:
  """Every evaluator of `config.evals`, in config order."""
  return [evaluator_module(name, settings).Evaluator(name, settings, task, inputs, workdir, writer)
          for name, settings in config.evals.items()]
