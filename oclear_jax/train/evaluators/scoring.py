"""What every evaluator shares: embed a split, search, score, save (`evaluate`), and title feedback.

All evaluators score with the same code as `--mode=evaluate` (`retrieval.evaluation`: exact search
as ground truth, ScaNN against it, Recall@K / MAP@R / Product1M metrics), on embeddings the input
source makes,
whichever source the run trains on. On N processes each embeds its share of the split
(`distributed.host_gather`); process 0 alone searches, scores, builds the ScaNN index and writes
the files, and every process gets its metrics, so all take the same decisions.

With `config.eval.title_feedback_docs` > 0, every score also re-ranks by the titles of each query's
top results (`retrieval.title_feedback`) and reports those metrics under prf/ beside the plain ones.
"""
from __future__ import annotations

import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import paths
from oclear_jax import models
from oclear_jax.distributed import host_gather
from oclear_jax.retrieval import evaluation
from oclear_jax.retrieval import title_feedback


# == Title feedback: unit title vectors of the eval rows =========================================
def jit_title_pooled(task, params):
  """device_batch -> the model's text tower pooled titles f32[B, T], zero rows for rows without a title."""
  def pooled(p, ids):
    _, vectors, _ = task.model.apply({"params": p}, ids, method=lambda m, x: m.text_encoder(x, train=False))
    return jnp.where(models.title_present(ids, task.model.title_special_ids)[:, None], vectors, 0.0)
  pooled = jax.jit(pooled)

  def run(batch):
    with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
      return pooled(params["encoder"], batch["title_tokens"])
  return run


def title_vectors(config, inputs, eval_set: evaluation.EvalSet, split: str) -> np.ndarray | None:
  """f32[N, T] per eval row (`title_feedback.title_vectors`, from the input source), or None."""
  if config.eval.title_feedback_docs > 0 and config.model.fusion == "image_only":
    logging.warning("config.eval.title_feedback_docs=%d but model.fusion='image_only' has no text tower: "
                    "no title feedback, no prf/ metrics", config.eval.title_feedback_docs)
  if not title_feedback.configured(config):
    return None
  return inputs.title_vectors(eval_set, split)


# == Embed, search, score, save ==================================================================
def evaluate(task, inputs, params, *, workdir: str, step: int, artifacts: bool = False,
             split: str = "eval") -> dict[str, float]:
  """Embeds `split` with `params`, searches, scores and saves the metrics; artifacts: index + contact sheet."""
  predict = task.jit_predict()
  # Records embed the text tower's titles in the same pass; cached sources hold them already.
  titles = jit_title_pooled(task, params) if title_feedback.configured(task.config) else None
  eval_set = inputs.eval_set(lambda b: predict(params, b), split, title_pooled=titles)
  # Every process holds the whole eval set; metrics, the ScaNN index and the files come from process 0 alone.
  return host_gather.computed_once(_score_and_write, task, inputs, eval_set, workdir=workdir, step=step,
                                   artifacts=artifacts, split=split)


def _score_and_write(task, inputs, eval_set: evaluation.EvalSet, *, workdir: str, step: int, artifacts: bool,
                     split: str) -> dict[str, float]:
  """Process 0's part of `evaluate`: search, score, save eval/step_N.json (+ ScaNN index, contact sheet)."""
  config = task.config
  result = evaluation.search_and_score_as_configured(
      config, eval_set, use_scann=config.eval.scann and split == "eval",
      scann_dir=os.path.join(workdir, "scann_index") if artifacts else None,
      title_vectors=title_vectors(config, inputs, eval_set, split))
  subdir = "eval" if split == "eval" else os.path.join("eval", split)
  evaluation.save_metrics(os.path.join(workdir, subdir, f"step_{step}.json"), step, result.metrics)
  if artifacts and config.eval.contact_sheet_queries > 0:
    wanted = evaluation.contact_sheet_ids(eval_set, result, config.eval.contact_sheet_queries)
    evaluation.write_contact_sheet(eval_set, result, inputs.images(wanted, split),
                                   os.path.join(workdir, "contact_sheet.png"), config.eval.contact_sheet_queries)
  return result.metrics


def write_json_atomic(path: str, value: dict) -> None:
  paths.makedirs(os.path.dirname(path))
  with paths.open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  paths.replace(path + ".tmp", path)


def load_eval_history(workdir: str, split: str = "eval") -> dict[int, dict[str, float]]:
  """{step: metrics} of the eval/step_N.json files a run wrote for `split` (resumed runs read them back)."""
  history = {}
  eval_dir = os.path.join(workdir, "eval") if split == "eval" else os.path.join(workdir, "eval", split)
  if paths.isdir(eval_dir):
    for name in paths.listdir(eval_dir):
      if name.startswith("step_") and name.endswith(".json"):
        with paths.open(paths.join(eval_dir, name)) as f:
          record = json.load(f)
        history[int(record.pop("step"))] = record
  return history
