"""The Beam path (DirectRunner) and the in-process path give the same category map and files."""
import pathlib

import pytest

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import synthetic_catalogue
from oclear_jax.governance import beam_pipeline
from oclear_jax.commands import govern
from oclear_jax.governance import curate
from oclear_jax.governance import executors
from oclear_jax.governance import settings as settings_lib

# Noisier than the default so that every step has work; small chunks so Beam runs many elements.
SPEC = synthetic_catalogue.CatalogueSpec(num_products=40, image_size=32, wrong_label_fraction=0.1,
                                         split_product_fraction=0.15, near_duplicate_fraction=0.1)
SETTINGS = settings_lib.defaults(image_features="pixels", chunk_size=40, executor="in_process")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  root = tmp_path_factory.mktemp("beam") / "catalogue"
  synthetic_catalogue.generate_catalogue(root, SPEC, progress=False)
  columns = catalogue_lib.CatalogueColumns(kind="kind", split="split")
  return catalogue_lib.read_catalogue(root / "catalogue.csv", columns).rows


def test_beam_and_in_process_agree(rows, tmp_path):
  in_process = executors.InProcessExecutor(progress=False)
  beam = beam_pipeline.BeamExecutor(runner="DirectRunner", staging_dir=str(tmp_path / "staging"), progress=False)
  local = curate.curate_categories(rows, SETTINGS, in_process)
  distributed = curate.curate_categories(rows, SETTINGS, beam)
  assert local.category_map == distributed.category_map
  assert local.weights == distributed.weights
  assert [(d.id, d.category, d.action, d.step) for d in local.decisions] == [
      (d.id, d.category, d.action, d.step) for d in distributed.decisions]
  # The run did real work on both paths, so the equality is not between two empty maps.
  steps = {d.step for d in local.decisions}
  assert {"outliers", "merge", "passthrough"} <= steps, steps
  # The record-writing pass writes the same bytes on both paths.
  a = govern.write_outputs(str(tmp_path / "a"), local, rows, SETTINGS, in_process)
  b = govern.write_outputs(str(tmp_path / "b"), distributed, rows, SETTINGS, beam)
  for name in ("curated_catalogue.csv", "decisions.csv", "category_map.csv", "class_weights.json"):
    assert pathlib.Path(a[name]).read_bytes() == pathlib.Path(b[name]).read_bytes(), name
  assert not list((tmp_path / "staging").iterdir())  # Staged chunks are cleaned up.
