"""The spine end to end: tiny config on a (4, 2) mesh trains, checkpoints, resumes and evaluates."""
import json
import os
import pathlib
import shutil

import pytest

from configs import tiny
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax.train import trainer


def _config(**train):
  config = tiny.get_config()
  config.mesh.shape = (4, 2)
  config.train.update(train)
  return config


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """Train 20 steps, stop; rerun the same experiment to 80 steps (resuming from step 20)."""
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  first = trainer.train_and_evaluate(_config(num_steps=20), workdir, progress=False)
  second = trainer.train_and_evaluate(_config(num_steps=80), workdir, progress=False)
  return workdir, first, second


def _train_steps_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records if "train/loss" in r]


def test_run_writes_every_artifact(resumed_run):
  workdir, _, _ = resumed_run
  root = pathlib.Path(workdir)
  for name in ("config.json", "metrics.jsonl", "recall_at_k.png", "contact_sheet.png",
               "eval/step_0.json", "eval/step_80.json", "records/records.json", "scann_index"):
    assert (root / name).exists(), name
  assert list((root / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit())[-1] == 80


def test_rerun_resumes_from_latest_checkpoint(resumed_run):
  workdir, first, second = resumed_run
  assert first["final_step"] == 20 and second["final_step"] == 80
  steps = _train_steps_logged(workdir)
  # Steps 1..20 were trained once; the second run started at 21, not at 1.
  assert steps == sorted(set(steps)) and steps[-1] == 80
  assert steps.count(20) == 1 and 30 in steps


def test_training_beats_untrained_model(resumed_run):
  _, _, second = resumed_run
  untrained, trained = second["eval"][0], second["eval"][80]
  # 20 held-out queries and 80 steps of a from-scratch nano ViT: the gain varies with the data order
  # (0.03 -> 0.06-0.10 mAP@R across seeds and input orders); 0.02 is a few queries moving up, not noise.
  assert trained["map@r"] > untrained["map@r"] + 0.02, (untrained, trained)
  assert trained["recall@1"] > untrained["recall@1"], (untrained, trained)
  assert trained["num_queries"] > 0


def test_incompatible_checkpoint_is_refused_and_kept(resumed_run, tmp_path):
  workdir, _, _ = resumed_run
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  before = sorted(str(p) for p in ckpt_dir.rglob("*"))
  config = _config(num_steps=100)
  config.model.embed_dim = 48
  # First line of defence: the config in force (run_config) refuses before anything is written ...
  with pytest.raises(ValueError, match="cannot change on resume: model.embed_dim: 32 -> 48"):
    trainer.train_and_evaluate(config, workdir, progress=False)
  assert sorted(str(p) for p in ckpt_dir.rglob("*")) == before
  # ... and where the workdir has no config.json, the checkpoint's own shapes refuse it.
  shutil.copytree(workdir, tmp_path / "run", ignore=shutil.ignore_patterns("config.json"))
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="different model"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").rglob("*")) == sorted(
      pathlib.Path(p).name for p in before)
