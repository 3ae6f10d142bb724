"""`type: frozen_row`: the frozen pretrained image tower's own pooled features, cosine, on the eval split.

Queries and documents alike, the same queries and gallery as the retrieval evaluator: the row a
trained model must beat. Step-independent, so it is scored once per run (eval/frozen.json, read
back on resume). The input source embeds the rows (`frozen_eval_set`): cached tower outputs hold
those features already; records are embedded by the state's image tower while it still holds the
pretrained weights, else by them loaded again. `result` is None when the image tower is not
pretrained.
"""
from __future__ import annotations

import json
import os

from input_pipeline import paths
from oclear_jax.distributed import host_gather
from oclear_jax.retrieval import evaluation
from oclear_jax.train.evaluators import registry
from oclear_jax.train.evaluators import scoring

FROZEN_FILE = "frozen.json"


class Evaluator(registry.Evaluator):

  def start(self, state, shardings, start_step: int) -> None:
    path = os.path.join(self.workdir, "eval", FROZEN_FILE)
    if paths.exists(path):
      with paths.open(path) as f:
        self.result = json.load(f)["metrics"]
      return
    eval_set = self.inputs.frozen_eval_set(self.task, state, shardings, fresh=start_step == 0)
    if eval_set is not None:
      self.result = host_gather.computed_once(_score_frozen, self.config, self.inputs, eval_set, path)


def _score_frozen(config, inputs, eval_set: evaluation.EvalSet, path: str) -> dict[str, float]:
  """Process 0's part: score and write eval/frozen.json."""
  result = evaluation.search_and_score_as_configured(
      config, eval_set, use_scann=config.eval.scann, title_vectors=scoring.title_vectors(config, inputs, eval_set, "eval"))
  paths.makedirs(os.path.dirname(path))
  with paths.open(path, "w") as f:
    json.dump({"model": f"frozen pretrained {config.model.image_tower}, pooled features, cosine",
               "metrics": result.metrics}, f, indent=2, sort_keys=True)
  return result.metrics
