"""Preemption and faults: exact resumption, NaN stops, clear one-line errors from the command line."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from oclear_jax.train import input_sources
from oclear_jax.train import trainer
import trained_state

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**train):
  config = tiny.get_config()
  config.train.update({**dict(num_steps=12, checkpoint_every=4, log_every=4, async_checkpoints=False), **train})
  config.eval.update(dict(at_start=False, scann=False, contact_sheet_queries=0))
  return config


def _final_params(config, workdir):
  _, state, step = trained_state.restore_trained_state(config, workdir)
  return step, state


def test_interrupted_runs_end_bitwise_equal_to_an_uninterrupted_one(tmp_path):
  config = _config()
  trainer.train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
  # Preempted between checkpoints: after step 6 (last save 4), then run to the end.
  broken = str(tmp_path / "broken")
  assert trainer.train_and_evaluate(config, broken, progress=False, stop_at_step=6)["final_step"] == 6
  trainer.train_and_evaluate(config, broken, progress=False)
  (step_a, a), (step_b, b) = _final_params(config, str(tmp_path / "straight")), _final_params(config, broken)
  assert step_a == step_b == 12
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The control: a run resumed with another data seed must differ, or this test proves nothing.
  other = _config()
  other.seed = 1
  trainer.train_and_evaluate(other, str(tmp_path / "other"), progress=False, stop_at_step=4)
  assert not np.array_equal(np.asarray(_final_params(other, str(tmp_path / "other"))[1]["params"]["class_centers"]),
                            np.asarray(a["params"]["class_centers"]))


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = _config(checkpoint_every=2)
  calls = {"n": 0}
  real = input_sources.RecordsInput.to_device

  def poisoned(self, batch):
    calls["n"] += 1
    if calls["n"] == 3:  # step 3
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      poisoned.ids = [i.decode() for i in batch["id"]]
    return real(self, batch)
  monkeypatch.setattr(input_sources.RecordsInput, "to_device", poisoned)
  with pytest.raises(FloatingPointError, match=r"not finite at step 3.*after step 2"):
    trainer.train_and_evaluate(config, str(tmp_path), progress=False)
  report = json.loads((tmp_path / "nonfinite" / "step_3.json").read_text())
  assert report["step"] == 3 and report["ids"] == poisoned.ids and not np.isfinite(report["loss"])
  monkeypatch.setattr(input_sources.RecordsInput, "to_device", real)
  assert _final_params(config, str(tmp_path))[0] == 2  # nothing past the last good step was saved


def _cli(tmp_path, *overrides, config="configs/tiny.py"):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run(
      [sys.executable, "-m", "oclear_jax.main", f"--config={config}", f"--workdir={tmp_path}", *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides,message", [
    (("--config.mesh.shape=(3,2)",), "needs 6 devices but 8 exist"),
    (("--config.data.source=csv", "--config.data.root=/nonexistent/catalogue"), "/nonexistent/catalogue"),
])
def test_command_line_errors_are_one_clear_line(tmp_path, overrides, message):
  proc = _cli(tmp_path, *overrides)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_catalogue_missing_a_column_is_named_on_the_command_line(tmp_path):
  root = tmp_path / "cat"
  root.mkdir()
  (root / "catalogue.csv").write_text("id,image,label\nx,a.jpg,l\n")
  proc = _cli(tmp_path / "w", "--config.data.source=csv", f"--config.data.root={root}",
              "--config.data.columns.kind=", "--config.data.columns.split=")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "no column 'title'" in proc.stderr and "config.data.columns.title" in proc.stderr
