"""Configs load, validate, document their launch command, and typos fail naming the key."""
import dataclasses
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
  # configs/catalogue.py reads any CSV, named by its argument (and refuses to guess one).
  config = module.get_config(str(REPO / "catalogue" / "meta.csv") if path.stem == "catalogue" else None)
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


# == One home for every default: the dataclasses that mirror a schema section agree with it ==========
def _plain(value):
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  return value.to_dict() if hasattr(value, "to_dict") else value


def _mirrors():
  """(dataclass, schema section, builder from the section, its fields that are not config keys)."""
  from input_pipeline import synthetic_catalogue  # pylint: disable=g-import-not-at-top
  from oclear_jax import models  # pylint: disable=g-import-not-at-top
  from oclear_jax.governance import settings as settings_lib  # pylint: disable=g-import-not-at-top
  return [
      (models.ModelConfig, "model", models.ModelConfig.from_config, {"vit_pool", "dropout", "title_special_ids"}),
      (models.TextConfig, "model.text", lambda s: models.TextConfig(**s.to_dict()), set()),
      (settings_lib.GovernanceSettings, "governance", settings_lib.from_config, set()),
      (synthetic_catalogue.CatalogueSpec, "data.synthetic", lambda s: synthetic_catalogue.CatalogueSpec(**s.to_dict()),
       {"docs_per_product", "zipf_exponent", "max_docs_per_product"}),
  ]


def test_dataclass_defaults_are_the_schema_defaults():
  for cls, section, build, not_config_keys in _mirrors():
    schema = config_schema._get(config_schema.base_config(), section)  # pylint: disable=protected-access
    built = build(schema)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) - set(schema) == not_config_keys, f"{cls.__name__}: fields the schema lacks"
    for name in set(fields) & set(schema):
      want, f = _plain(schema[name]), fields[name]
      assert _plain(getattr(built, name)) == want, f"{cls.__name__}.{name} built from config.{section}"
      default = (f.default if f.default is not dataclasses.MISSING else
                 f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
      if default is not dataclasses.MISSING:  # a default that remains must be the schema's
        assert _plain(default) == want, f"{cls.__name__}.{name} default {default!r} != config.{section}.{name}"


def test_the_built_model_carries_the_schema_values():
  from oclear_jax import models  # pylint: disable=g-import-not-at-top
  schema = config_schema.base_config().model
  model = models.build_model(schema, vocab_size=64, max_title_len=8)
  own = [f for f in dataclasses.fields(models.OclearModel) if f.name not in ("parent", "name")]
  assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in own), \
      "OclearModel restates defaults: build_model passes every field from config.model"
  for name in {f.name for f in own} & set(schema):
    assert getattr(model, name) == schema[name], f"OclearModel.{name}"


def test_the_catalogue_config_needs_its_csv():
  with pytest.raises(ValueError, match="configs/catalogue.py:DIR/meta.csv"):
    _load(REPO / "configs" / "catalogue.py").get_config()
