"""`type: retrieval`: held-out queries against the gallery of a split (`eval` by default).

At step 0 (`config.eval.at_start`, fresh runs only), every `config.eval.every` steps and after
the last step, which also builds the ScaNN index (workdir/scann_index) and the contact sheet and
plots Recall@K of the untrained and the trained model (recall_at_k.png). Metrics go to
eval/step_N.json (another split: eval/<split>/step_N.json) and to the metric writer as
`<name>/<metric>`; `result` is {step: metrics} of every step scored, resumed runs included.
"""
from __future__ import annotations

import os

from input_pipeline import paths
from oclear_jax.distributed import multihost
from oclear_jax.retrieval import plots
from oclear_jax.train.evaluators import registry
from oclear_jax.train.evaluators import scoring


class Evaluator(registry.Evaluator):

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.split = self.settings.get("split", "eval")
    self.result = scoring.load_eval_history(self.workdir, self.split)

  def _score(self, state, step: int, *, artifacts: bool = False) -> None:
    self.result[step] = scoring.evaluate(self.task, self.inputs, state["params"], workdir=self.workdir, step=step,
                                         artifacts=artifacts, split=self.split)
    self.writer.write(step, {f"{self.name}/{k}": v for k, v in self.result[step].items()})

  def start(self, state, shardings, start_step: int) -> None:
    del shardings
    if self.config.eval.at_start and start_step == 0 and 0 not in self.result:
      self._score(state, 0)

  def at_step(self, state, step: int) -> None:
    self._score(state, step)

  def last(self, state, step: int) -> None:
    if step not in self.result or not paths.exists(paths.join(self.workdir, "contact_sheet.png")):
      self._score(state, step, artifacts=True)
    curves = {("untrained" if s == 0 else f"step {s}"): {k: m[f"recall@{k}"] for k in self.config.eval.ks}
              for s, m in sorted(self.result.items()) if s in (0, step)}
    multihost.run_on_process_zero(plots.plot_recall_at_k, curves, os.path.join(self.workdir, "recall_at_k.png"))
