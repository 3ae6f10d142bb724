"""`type: checkpoint_selection`: the step with the best validation MAP@R, its state kept apart.

`config.eval.select_on='val'` names the split: training products held out of training, never the
eval split ('' switches selection off). Scored at step 0 (a trained model must beat its own step 0),
every `config.eval.every` steps and the last; the best step's state is the one checkpoint in
checkpoints_best/ (beside the orbax step directory, so keep-N never deletes it), and
eval/best.json holds {split, metric, step, value, history: {step: value}} (`result`). A resumed run
reads it back and only scores steps it has not scored (a replayed step's state is bitwise the same).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from input_pipeline import paths
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax.distributed import multihost
from oclear_jax.train.evaluators import registry
from oclear_jax.train.evaluators import scoring

BEST_FILE = "best.json"
SELECT_METRIC = "map@r"


class Evaluator(registry.Evaluator):

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.split = self.config.eval.select_on
    self._store = None
    if not self.split:
      return
    if not self.inputs.has_split(self.split):
      raise ValueError(f"config.eval.select_on={self.split!r} but the catalogue has no usable rows with split "
                       f"{self.split!r} for data.input={self.config.data.input!r}; add validation rows "
                       f"(training products, never eval ones) or set config.eval.select_on=''")
    path = os.path.join(self.workdir, "eval", BEST_FILE)
    if paths.exists(path):
      with paths.open(path) as f:
        self.result = json.load(f)
    self._store = checkpoint_lib.CheckpointStore(checkpoint_lib.best_checkpoint_dir(self.workdir), max_to_keep=1,
                                                 async_save=False)

  def start(self, state, shardings, start_step: int) -> None:
    del shardings
    if start_step == 0:
      self._select(state, 0)

  def at_step(self, state, step: int) -> None:
    self._select(state, step)

  def last(self, state, step: int) -> None:
    self._select(state, step)

  def _select(self, state, step: int) -> None:
    if not self.split or (self.result and str(step) in self.result["history"]):
      return
    metrics = scoring.evaluate(self.task, self.inputs, state["params"], workdir=self.workdir, step=step,
                               split=self.split)
    value = float(metrics[SELECT_METRIC])
    history = {**(self.result or {}).get("history", {}), str(step): value}
    best = self.result
    if best is None or not np.isfinite(best["value"]) or value > best["value"]:
      self._store.save(step, state, force=True)  # synchronous: the file below never names a missing state
      best = {"split": self.split, "metric": SELECT_METRIC, "step": int(step), "value": value,
              "checkpoint": os.path.join(checkpoint_lib.best_checkpoint_dir(self.workdir), str(step))}
      logging.info("step %d is the best so far on %s (%s %.4f)", step, self.split, SELECT_METRIC, value)
    self.result = {**best, "history": history}
    multihost.run_on_process_zero(scoring.write_json_atomic, os.path.join(self.workdir, "eval", BEST_FILE),
                                  self.result)

  def close(self) -> None:
    if self._store is not None:
      self._store.close()
