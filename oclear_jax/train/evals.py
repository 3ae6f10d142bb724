"""The trainer's evaluators: held-out retrieval, the "frozen pretrained" row, checkpoint selection.

All three score with the same evaluator code (`retrieval.evaluation`: exact search as ground
truth, ScaNN against it, Recall@K / MAP@R / Product1M metrics), on embeddings an input source
(`train/input_sources`) makes, whichever source the run trains on:

* `evaluate`: the eval split at a step -> eval/step_N.json (other splits: eval/<split>/step_N.json);
* `frozen_row`: the pretrained image tower's own pooled features, cosine, queries and documents
  alike, on the same queries and gallery -> eval/frozen.json, once per run (step-independent);
* `CheckpointSelection` (`config.eval.select_on='val'`): scores the validation rows (training
  products held out of training, never the eval split) at step 0, every `eval.every` steps and
  the last, and keeps the best step by MAP@R in checkpoints_best/ (beside the orbax step
  directory, so keep-N never deletes it) with eval/best.json.

On N processes each embeds its share of the split (`distributed.host_gather`); process 0 alone
searches, scores, builds the ScaNN index and writes the files, and every process gets its metrics,
so all take the same decisions (checkpoint selection saves collectively).

With `config.eval.title_feedback_docs` > 0, every score also re-ranks by the titles of each query's
top results (`retrieval.title_feedback`) and reports those metrics under prf/ beside the plain ones.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import models
from oclear_jax.distributed import multihost
from input_pipeline import paths
from oclear_jax.train import pretrained_towers
from oclear_jax.distributed import host_gather
from oclear_jax.retrieval import evaluation
from oclear_jax.retrieval import scann_search
from oclear_jax.retrieval import title_feedback

FROZEN_FILE = "frozen.json"
BEST_FILE = "best.json"
SELECT_METRIC = "map@r"


best_checkpoint_dir = checkpoint_lib.best_checkpoint_dir


def _search_and_score(config, eval_set: evaluation.EvalSet, *, use_scann: bool, scann_dir: str | None = None,
                      title_vectors: np.ndarray | None = None):
  return evaluation.search_and_score(
      eval_set, ks=tuple(config.eval.ks), use_scann=use_scann, scann_dir=scann_dir,
      cutoffs=tuple(config.eval.get("cutoffs", ())), scann_params=scann_search.params_from_config(config.index),
      title_vectors=title_vectors, feedback_docs=config.eval.get("title_feedback_docs", 0),
      feedback_weight=config.eval.get("title_feedback_weight", 0.4))


# == Title feedback: unit title vectors of the eval rows =========================================
def _title_feedback_on(config) -> bool:
  return (config.eval.get("title_feedback_docs", 0) > 0 and config.eval.get("title_feedback_weight", 0.4) > 0
          and config.model.fusion != "image_only")


def _jit_title_pooled(task, params):
  """device_batch -> the model's text tower pooled titles f32[B, T], zero rows for rows without a title."""
  def pooled(p, ids):
    _, vectors, _ = task.model.apply({"params": p}, ids, method=lambda m, x: m.text_encoder(x, train=False))
    return jnp.where(models.title_present(ids, task.model.title_special_ids)[:, None], vectors, 0.0)
  pooled = jax.jit(pooled)

  def run(batch):
    with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
      return pooled(params["encoder"], batch["title_tokens"])
  return run


def _cached_tower_outputs(inputs) -> bool:
  """The cached-input sources (tower_features, trunk_activations) hold the frozen towers' outputs, titles included."""
  return getattr(inputs, "splits", None) is not None


def _title_vectors(config, inputs, eval_set: evaluation.EvalSet, split: str) -> np.ndarray | None:
  """f32[N, T] per eval row (`title_feedback.title_vectors`), or None: no title feedback.

  Cached inputs: the cached frozen MiniLM titles, centred by the training rows' mean. Records: the
  text tower's pooled titles the predict function returned (`EvalSet.title_pooled`), centred by the
  gallery's own mean (a training-split mean would need a pass over the training records).
  """
  if config.eval.get("title_feedback_docs", 0) > 0 and config.model.fusion == "image_only":
    logging.warning("config.eval.title_feedback_docs=%d but model.fusion='image_only' has no text tower: "
                    "no title feedback, no prf/ metrics", config.eval.title_feedback_docs)
  if not _title_feedback_on(config):
    return None
  if _cached_tower_outputs(inputs):
    train, rows = inputs.splits["train"].table, inputs.splits[split].table
    return title_feedback.title_vectors(rows.text_pooled, rows.present,
                                        title_feedback.title_mean(train.text_pooled, train.present))
  if eval_set.title_pooled is None:  # embedded without the text tower (the frozen row of records)
    return None
  present = np.any(eval_set.title_pooled != 0, axis=1)
  mean = title_feedback.title_mean(eval_set.title_pooled, present & (eval_set.kinds == evaluation.DOC))
  return title_feedback.title_vectors(eval_set.title_pooled, present, mean)


def evaluate(task, inputs, params, *, workdir: str, step: int, artifacts: bool = False,
             split: str = "eval") -> dict[str, float]:
  """Embeds `split` with `params`, searches, scores and saves the metrics; artifacts: index + contact sheet."""
  config = task.config
  predict = task.jit_predict()
  if _title_feedback_on(config) and not _cached_tower_outputs(inputs):
    titles = _jit_title_pooled(task, params)  # records: the text tower's titles, in the same pass
    eval_set = inputs.eval_set(lambda b: {**predict(params, b), "title": titles(b)}, split)
  else:
    eval_set = inputs.eval_set(lambda b: predict(params, b), split)
  # Every process holds the whole eval set; metrics, the ScaNN index and the files come from process 0 alone.
  return host_gather.computed_once(_score_and_write, task, inputs, eval_set, workdir=workdir, step=step,
                                   artifacts=artifacts, split=split)


def _score_and_write(task, inputs, eval_set: evaluation.EvalSet, *, workdir: str, step: int, artifacts: bool,
                     split: str) -> dict[str, float]:
  """Process 0's part of `evaluate`: search, score, save eval/step_N.json (+ ScaNN index, contact sheet)."""
  config = task.config
  result = _search_and_score(config, eval_set, use_scann=config.eval.scann and split == "eval",
                             scann_dir=os.path.join(workdir, "scann_index") if artifacts else None,
                             title_vectors=_title_vectors(config, inputs, eval_set, split))
  subdir = "eval" if split == "eval" else os.path.join("eval", split)
  evaluation.save_metrics(os.path.join(workdir, subdir, f"step_{step}.json"), step, result.metrics)
  if artifacts and config.eval.contact_sheet_queries > 0:
    wanted = evaluation.contact_sheet_ids(eval_set, result, config.eval.contact_sheet_queries)
    evaluation.write_contact_sheet(eval_set, result, inputs.images(wanted, split),
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
  if paths.exists(path):
    with paths.open(path) as f:
      return json.load(f)["metrics"]
  features = _cached_tower_outputs(inputs)  # the cached frozen pooled features are the frozen row
  if not (features or config.model.image_pretrained):
    return None
  pooled = None
  if not features:
    params = state["params"]
    if not (fresh or config.model.freeze_image_tower):  # fine-tuned since: the pretrained weights again
      params = pretrained_towers.load_pretrained_into_state(state, shardings, config.model)["params"]
    pooled = task.jit_pooled(params)
  eval_set = inputs.frozen_eval_set(pooled)
  return host_gather.computed_once(_score_frozen, config, inputs, eval_set, path)


def _score_frozen(config, inputs, eval_set: evaluation.EvalSet, path: str) -> dict[str, float]:
  """Process 0's part of `frozen_row`: score and write eval/frozen.json."""
  result = _search_and_score(config, eval_set, use_scann=config.eval.scann,
                             title_vectors=_title_vectors(config, inputs, eval_set, "eval"))
  paths.makedirs(os.path.dirname(path))
  with paths.open(path, "w") as f:
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
    if paths.exists(path):
      with paths.open(path) as f:
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
    multihost.run_on_process_zero(_write_json_atomic, os.path.join(self.workdir, "eval", BEST_FILE), self.best)

  def close(self) -> None:
    if self._store is not None:
      self._store.close()


def _write_json_atomic(path: str, value: dict) -> None:
  paths.makedirs(os.path.dirname(path))
  with paths.open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  paths.replace(path + ".tmp", path)


def load_eval_history(workdir: str) -> dict[int, dict[str, float]]:
  history = {}
  eval_dir = os.path.join(workdir, "eval")
  if paths.isdir(eval_dir):
    for name in paths.listdir(eval_dir):
      if name.startswith("step_") and name.endswith(".json"):
        with paths.open(paths.join(eval_dir, name)) as f:
          record = json.load(f)
        history[int(record.pop("step"))] = record
  return history
