"""The trainer's evaluators: held-out retrieval, the "frozen pretrained" row, checkpoint selection.

All three score with the same evaluator code (`evaluators.retrieval`: exact search as ground
truth, ScaNN against it, Recall@K / MAP@R / Product1M metrics), on embeddings an input source
(`train_inputs`) makes, whichever source the run trains on:

* `evaluate`: the eval split at a step -> eval/step_N.json (other splits: eval/<split>/step_N.json);
* `frozen_row`: the pretrained image tower's own pooled features, cosine, queries and documents
  alike, on the same queries and gallery -> eval/frozen.json, once per run (step-independent);
* `CheckpointSelection` (`config.eval.select_on='val'`): scores the validation rows (training
  products held out of training, never the eval split) at step 0, every `eval.every` steps and
  the last, and keeps the best step by MAP@R in checkpoints_best/ (beside the orbax step
  directory, so keep-N never deletes it) with eval/best.json.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import pretrained_towers
from oclear_jax.evaluators import retrieval
from oclear_jax.evaluators import scann_search

FROZEN_FILE = "frozen.json"
BEST_FILE = "best.json"
SELECT_METRIC = "map@r"


def best_checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints_best")


def _search_and_score(config, eval_set: retrieval.EvalSet, *, use_scann: bool, scann_dir: str | None = None):
  return retrieval.search_and_score(
      eval_set, ks=tuple(config.eval.ks), use_scann=use_scann, scann_dir=scann_dir,
      cutoffs=tuple(config.eval.get("cutoffs", ())), scann_params=scann_search.params_from_config(config.index))


def evaluate(task, inputs, params, *, workdir: str, step: int, artifacts: bool = False,
             split: str = "eval") -> dict[str, float]:
  """Embeds `split` with `params`, searches, scores and saves the metrics; artifacts: index + contact sheet."""
  config = task.config
  predict = task.jit_predict()
  eval_set = inputs.eval_set(lambda b: predict(params, b), split)
  result = _search_and_score(config, eval_set, use_scann=config.eval.scann and split == "eval",
                             scann_dir=os.path.join(workdir, "scann_index") if artifacts else None)
  subdir = "eval" if split == "eval" else os.path.join("eval", split)
  if jax.process_index() == 0:
    retrieval.save_metrics(os.path.join(workdir, subdir, f"step_{step}.json"), step, result.metrics)
  if artifacts and config.eval.contact_sheet_queries > 0 and jax.process_index() == 0:
    wanted = retrieval.contact_sheet_ids(eval_set, result, config.eval.contact_sheet_queries)
    retrieval.write_contact_sheet(eval_set, result, inputs.images(wanted, split),
                                  os.path.join(workdir, "contact_sheet.png"), config.eval.contact_sheet_queries)
  return result.metrics


def frozen_row(task, inputs, state, shardings, workdir: str, *, fresh: bool) -> dict[str, float] | None:
  """Metrics of the frozen pretrained image tower on the eval split (eval/frozen.json), or None.

  Cached features hold those pooled features already; records are embedded by the state's image
  tower when it still holds the pretrained weights (frozen, or a fresh run), else by the
  pretrained weights loaded again. None when the image tower is not pretrained.
  """
  config = task.config
  path = os.path.join(workdir, "eval", FROZEN_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)["metrics"]
  features = config.data.get("input", "records") == "tower_features"
  if not (features or config.model.image_pretrained):
    return None
  pooled = None
  if not features:
    params = state["params"]
    if not (fresh or config.model.freeze_image_tower):  # fine-tuned since: the pretrained weights again
      params = pretrained_towers.load_pretrained_into_state(state, shardings, config.model)["params"]
    pooled = task.jit_pooled(params)
  result = _search_and_score(config, inputs.frozen_eval_set(pooled), use_scann=config.eval.scann)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"model": f"frozen pretrained {config.model.image_tower}, pooled features, cosine",
                 "metrics": result.metrics}, f, indent=2, sort_keys=True)
  return result.metrics


class CheckpointSelection:
  """`config.eval.select_on`: the step with the best validation MAP@R, its state kept apart.

  eval/best.json: {split, metric, step, value, history: {step: value}}; the state of `step` is
  the one checkpoint in checkpoints_best/ (`trainer.restore_trained_state(..., best=True)`). A
  resumed run reads it back and only scores steps it has not scored (a replayed step's state is
  bitwise the same).
  """

  def __init__(self, task, inputs, workdir: str):
    self.task, self.inputs, self.workdir = task, inputs, workdir
    self.split = task.config.eval.get("select_on", "")
    self.best: dict[str, Any] | None = None
    self._store = None
    if not self.split:
      return
    if not inputs.has_split(self.split):
      raise ValueError(f"config.eval.select_on={self.split!r} but the catalogue has no usable rows with split "
                       f"{self.split!r} for data.input={task.config.data.get('input', 'records')!r}; add "
                       f"validation rows (training products, never eval ones) or set config.eval.select_on=''")
    path = os.path.join(workdir, "eval", BEST_FILE)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        self.best = json.load(f)
    self._store = checkpoint_lib.CheckpointStore(best_checkpoint_dir(workdir), max_to_keep=1, async_save=False)

  def __call__(self, state, step: int) -> None:
    if not self.split or (self.best and str(step) in self.best["history"]):
      return
    metrics = evaluate(self.task, self.inputs, state["params"], workdir=self.workdir, step=step, split=self.split)
    value = float(metrics[SELECT_METRIC])
    history = {**(self.best or {}).get("history", {}), str(step): value}
    best = self.best
    if best is None or not np.isfinite(best["value"]) or value > best["value"]:
      self._store.save(step, state, force=True)  # synchronous: the file below never names a missing state
      best = {"split": self.split, "metric": SELECT_METRIC, "step": int(step), "value": value,
              "checkpoint": os.path.join(best_checkpoint_dir(self.workdir), str(step))}
      logging.info("step %d is the best so far on %s (%s %.4f)", step, self.split, SELECT_METRIC, value)
    self.best = {**best, "history": history}
    if jax.process_index() == 0:
      path = os.path.join(self.workdir, "eval", BEST_FILE)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(self.best, f, indent=2)
      os.replace(path + ".tmp", path)

  def close(self) -> None:
    if self._store is not None:
      self._store.close()


def load_eval_history(workdir: str) -> dict[int, dict[str, float]]:
  history = {}
  eval_dir = os.path.join(workdir, "eval")
  if os.path.isdir(eval_dir):
    for name in os.listdir(eval_dir):
      if name.startswith("step_") and name.endswith(".json"):
        with open(os.path.join(eval_dir, name), encoding="utf-8") as f:
          record = json.load(f)
        history[int(record.pop("step"))] = record
  return history
