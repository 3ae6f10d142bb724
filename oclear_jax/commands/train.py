"""`--mode=train` (the default): govern if the config asks and it has not run, train or resume, print the table.

The table (`results_table`) shows the frozen pretrained tower, step 0 and the trained model on the
same held-out queries and gallery, each followed by its title-feedback row where the eval ran it.
"""
from __future__ import annotations

import ml_collections

from input_pipeline import paths
from oclear_jax import config_schema
from oclear_jax import run_config
from oclear_jax import run_data
from oclear_jax.distributed import workdir_lock
from oclear_jax.commands import govern
from oclear_jax.retrieval import tables
from oclear_jax.train import trainer


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_schema.validate(config)
  with workdir_lock.hold(workdir, stale_after_s=config.train.lock_stale_s):  # governing writes the workdir too
    run_config.check(config, workdir)  # a refused resume fails before governing
    if config.data.governed and not paths.exists(run_data.governed_catalogue_path(workdir)):
      # One command from a raw catalogue to a trained model: govern first (what --mode=govern does).
      print(f"{run_data.governed_catalogue_path(workdir)} does not exist: governing the catalogue first")
      govern.run_mode(config, workdir)
    result = trainer.train_and_evaluate(config, workdir)
  selected = (result.get("best") or {}).get("step")
  history = {s: m for s, m in result["eval"].items() if s in (0, result["final_step"], selected)}
  ks = tuple(k for k in config.eval.ks if k in (1, 5, 10))
  print("\nImage queries -> image+title documents (held-out products, exact search):")
  print(results_table(history, ks, frozen=result.get("frozen"), selected_step=selected))
  print(run_config.describe(workdir))
  print(f"\nEverything is under {workdir}: config.json, metrics.jsonl, tensorboard/, checkpoints/, eval/, "
        f"recall_at_k.png, contact_sheet.png, scann_index/")
  return result


def results_table(history: dict[int, dict[str, float]], ks=(1, 5, 10), *,
                  frozen: dict[str, float] | None = None, selected_step: int | None = None) -> str:
  """A plain-text table: the frozen pretrained tower (eval/frozen.json), untrained (step 0), trained.

  `selected_step` marks the step `config.eval.select_on` chose (eval/best.json). Where the eval
  re-ranked by title feedback (`eval.title_feedback_docs`), each row is followed by its prf/ row.
  """
  named = ([("frozen pretrained (pooled, cosine)", frozen)] if frozen else []) + [
      ("untrained (step 0)" if step == 0 else
       f"trained (step {step}{', selected on val' if step == selected_step else ''})", history[step])
      for step in sorted(history)]
  return tables.metrics_table(named, ks)
