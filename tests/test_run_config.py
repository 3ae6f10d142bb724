"""A config that never lies (oclear_jax/run_config.py): a resume refuses what changes the checkpoints'
parameters, before writing anything, and records what may change, keeping config.json the first config.

The workdirs here are made by hand (a config.json and a checkpoint folder): the rule reads no arrays.
One real resume (a tiny run) checks the trainer applies it before it writes.
"""
import hashlib
import json
import os
import pathlib

import pytest

from configs import tiny
from oclear_jax import config_schema
from oclear_jax import run_config
from oclear_jax.train import trainer


def _workdir(tmp_path, step: int = 20) -> str:
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / str(step)).mkdir(parents=True)
  (workdir / "config.json").write_text(tiny.get_config().to_json_best_effort(indent=2))
  return str(workdir)


def _files(workdir) -> dict[str, str]:
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(workdir).rglob("*")) if p.is_file()}


REFUSED = {  # one per kind of field that shapes or means the parameters
    "model width": ("model", "embed_dim", 16),
    "classes (the data)": ("data", "synthetic", {"num_products": 40}),
    "tower": ("model", "vit", "mu"),
    "tokenizer": ("data", "vocab_size", 200),
    "margin": ("head", "margin", "arcface"),
    "seed": (None, "seed", 3),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_a_resume_that_changes_the_parameters_is_refused_and_writes_nothing(kind, tmp_path):
  section, key, value = REFUSED[kind]
  workdir = _workdir(tmp_path)
  before = _files(workdir)
  config = tiny.get_config()
  node = config if section is None else config[section]
  if isinstance(value, dict):
    node[key].update(value)
    key = f"{key}.{next(iter(value))}"
  else:
    node[key] = value
  with pytest.raises(run_config.ConfigChangedError, match=rf"cannot change on resume: {section + '.' if section else ''}"
                                                         rf"{key}: .* -> .*Nothing was written"):
    run_config.start(config, workdir)
  assert _files(workdir) == before  # config.json's bytes included


def test_allowed_changes_are_recorded_per_resume_and_read_back_as_the_config_in_force(tmp_path):
  workdir = _workdir(tmp_path, step=20)
  first = (pathlib.Path(workdir) / "config.json").read_bytes()
  config = tiny.get_config()
  config.optimizer.learning_rate = 1e-3
  config.train.update(num_steps=60, batch_size=16)
  assert run_config.start(config, workdir) == {"optimizer.learning_rate": [3e-3, 1e-3], "train.batch_size": [32, 16],
                                              "train.num_steps": [40, 60]}
  os.rename(os.path.join(workdir, "checkpoints", "20"), os.path.join(workdir, "checkpoints", "45"))
  config.train.num_steps = 30  # lower than the restored step: allowed, and recorded
  assert run_config.start(config, workdir) == {"train.num_steps": [60, 30]}
  assert (pathlib.Path(workdir) / "config.json").read_bytes() == first  # the first config, untouched
  assert [(e["step"], sorted(e["changed"])) for e in run_config.history(workdir)] == [
      (20, ["optimizer.learning_rate", "train.batch_size", "train.num_steps"]), (45, ["train.num_steps"])]
  in_force = run_config.load(workdir)
  assert (in_force.optimizer.learning_rate, in_force.train.batch_size, in_force.train.num_steps) == (1e-3, 16, 30)
  assert "optimizer.learning_rate 0.003 -> 0.001 from step 20" in run_config.describe(workdir)
  assert run_config.start(config, workdir) == {}  # the same config again: nothing more to record
  assert len(run_config.history(workdir)) == 2


def test_every_field_that_may_change_on_resume_is_a_field_of_the_schema():
  flat = run_config._flat(config_schema.base_config())  # pylint: disable=protected-access
  for field in config_schema.RESUME_MAY_CHANGE:
    assert any(key == field or key.startswith(field + ".") for key in flat), field
  assert not run_config.may_change("model.embed_dim") and run_config.may_change("eval.every")


def test_a_fresh_workdir_gets_config_json_and_a_workdir_without_checkpoints_starts_afresh(tmp_path):
  workdir = str(tmp_path / "fresh")
  os.makedirs(workdir)
  config = tiny.get_config()
  run_config.start(config, workdir)
  assert json.loads((tmp_path / "fresh" / "config.json").read_text())["model"]["embed_dim"] == 32
  config.model.embed_dim = 16  # nothing trained yet: the new config is the run's first
  run_config.start(config, workdir)
  assert json.loads((tmp_path / "fresh" / "config.json").read_text())["model"]["embed_dim"] == 16


def test_the_trainer_refuses_an_incompatible_resume_before_writing_anything(tmp_path):
  config = tiny.get_config()
  config.train.update(num_steps=2, checkpoint_every=2, log_every=1)
  config.eval.update(at_start=False, scann=False, contact_sheet_queries=0)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir, progress=False)
  before = _files(workdir)
  config.model.embed_dim = 16
  with pytest.raises(run_config.ConfigChangedError, match="model.embed_dim: 32 -> 16"):
    trainer.train_and_evaluate(config, workdir, progress=False)
  assert _files(workdir) == before
