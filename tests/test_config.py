"""Configs load, validate, document their launch command, and typos fail naming the key."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from oclear_jax import config_schema

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_validates_and_documents_launch(path):
  module = _load(path)
  assert "python -m oclear_jax.main" in module.__doc__ and f"configs/{path.name}" in module.__doc__
  config = module.get_config()
  config_schema.validate(config)
  # Experiment configs only override fields the schema defines.
  assert set(config.to_dict()) == set(config_schema.base_config().to_dict())


def test_missing_required_field_is_named():
  config = config_schema.base_config()
  config.data.source = ""
  with pytest.raises(ValueError, match="config.data.source"):
    config_schema.validate(config)
  config = config_schema.base_config()
  config.data.source = "csv"
  with pytest.raises(ValueError, match="config.data.root"):
    config_schema.validate(config)


def test_unknown_override_on_the_command_line_names_the_key(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run(
      [sys.executable, "-m", "oclear_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
       "--config.train.num_step=5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "num_step" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()
