"""A trained run's whole train state (class centres and optimizer state included), for tests.

What tests compare runs on (bitwise resumption) or evaluate through the trainer's task. Serving
reads the model's parameters alone (`trained_run.restore_trained_model`, built on
`checkpoint.restore_model_params`); this helper is the full-state counterpart, built from the
public pieces: the run's records, an `OclearTask` on the config's mesh, a read-only
`CheckpointStore` (it leaves an unreadable step in place and restores the previous one).
"""
import os

import ml_collections

from input_pipeline import paths
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import run_data
from oclear_jax import sharding
from oclear_jax.train import trainer


def restore_trained_state(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, *,
                          prepared: run_data.PreparedData | None = None, best: bool = False):
  """(task, state, step) of the run in `workdir` (latest checkpoint by default), on this config's mesh.

  `prepared` skips re-reading the catalogue when the caller already has the run's records;
  `best` restores the checkpoint `config.eval.select_on` selected (eval/best.json) instead.
  """
  prepared = prepared or run_data.prepare_data(config.data, workdir, seed=config.seed, progress=False)
  task = trainer.OclearTask(config, sharding.make_mesh(config.mesh.shape), num_classes=prepared.num_classes,
                            vocab_size=prepared.vocab_size, title_special_ids=prepared.title_special_ids)
  abstract, shardings = task.abstract_state()
  directory = checkpoint_lib.best_checkpoint_dir(workdir) if best else os.path.join(workdir, "checkpoints")
  if not paths.isdir(checkpoint_lib.orbax_directory(directory)):
    raise FileNotFoundError(f"no checkpoint in {directory}; train first (--mode=train)")
  store = checkpoint_lib.CheckpointStore(directory, read_only=True)
  try:
    state, step = store.restore(checkpoint_lib.abstract_with_shardings(abstract, shardings), step)
  finally:
    store.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {directory}; train first (--mode=train)")
  store.report_broken(step)
  return task, state, step
