"""The Beam path (DirectRunner, and a 2-worker Dask cluster) and the in-process path give the same decisions."""
import collections
import os
import pathlib
import pickle

import pytest

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import synthetic_catalogue
from oclear_jax.governance import beam_pipeline
from oclear_jax.commands import govern
from oclear_jax.governance import curate
from oclear_jax.governance import executors
from oclear_jax.governance import planted_noise
from oclear_jax.governance import settings as settings_lib

# Noisier than the default, labels covering two products planted and a head cap, so that every step has
# work; small chunks so Beam runs many elements.
SPEC = synthetic_catalogue.CatalogueSpec(num_products=80, image_size=32, wrong_label_fraction=0.1,
                                         split_product_fraction=0.15, near_duplicate_fraction=0.1)
SETTINGS = settings_lib.defaults(image_features="pixels", chunk_size=40, executor="in_process", max_category_size=5)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  root = tmp_path_factory.mktemp("beam") / "catalogue"
  synthetic_catalogue.generate_catalogue(root, SPEC, progress=False)
  columns = catalogue_lib.CatalogueColumns(kind="kind", split="split")
  rows = catalogue_lib.read_catalogue(root / "catalogue.csv", columns).rows
  return planted_noise.plant_label_noise(rows, wrong_fraction=0.0, split_fraction=0.0, merge_fraction=0.2, seed=1)[0]


@pytest.fixture(scope="module")
def local(rows):
  return curate.curate_categories(rows, SETTINGS, executors.InProcessExecutor(progress=False))


def _assert_same_decisions(local, distributed):
  assert local.category_map == distributed.category_map
  assert local.weights == distributed.weights
  assert [(d.id, d.category, d.action, d.step, d.reason) for d in local.decisions] == [
      (d.id, d.category, d.action, d.step, d.reason) for d in distributed.decisions]
  # The run did real work, so the equality is not between two empty maps.
  steps = {d.step for d in local.decisions}
  assert {"outliers", "merge", "split", "duplicates", "head_cap", "passthrough"} <= steps, steps


def test_beam_and_in_process_agree(rows, local, tmp_path):
  in_process = executors.InProcessExecutor(progress=False)
  beam = beam_pipeline.BeamExecutor(runner="DirectRunner", staging_dir=str(tmp_path / "staging"), progress=False)
  distributed = curate.curate_categories(rows, SETTINGS, beam)
  _assert_same_decisions(local, distributed)
  # The record-writing pass writes the same bytes on both paths.
  a = govern.write_outputs(str(tmp_path / "a"), local, rows, SETTINGS, in_process)
  b = govern.write_outputs(str(tmp_path / "b"), distributed, rows, SETTINGS, beam)
  for name in ("curated_catalogue.csv", "decisions.csv", "category_map.csv", "class_weights.json"):
    assert pathlib.Path(a[name]).read_bytes() == pathlib.Path(b[name]).read_bytes(), name
  assert not list((tmp_path / "staging").iterdir())  # Staged chunks are cleaned up.


def test_a_two_worker_dask_cluster_gives_the_same_decisions(rows, local, tmp_path):
  distributed_lib = pytest.importorskip("distributed")
  with distributed_lib.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    dashboard_address=None) as cluster:
    beam = beam_pipeline.BeamExecutor(runner="apache_beam.runners.dask.dask_runner.DaskRunner",
                                      options=f"--dask_client_address={cluster.scheduler_address}",
                                      staging_dir=str(tmp_path / "staging"), progress=False)
    distributed = curate.curate_categories(rows, SETTINGS, beam)
    with distributed_lib.Client(cluster.scheduler_address) as client:
      workers = client.run(os.getpid)
  _assert_same_decisions(local, distributed)
  assert len(set(workers.values()) - {os.getpid()}) == 2  # two worker processes, neither of them this one


def _emit_residues(chunk, modulus):
  for x in chunk:
    yield (x % modulus, bytes([x % 2])), x


def _reduce_residue(key, values, modulus):
  return None if key[0] == 0 else (key, sorted(values))  # a None reduction does not come back


def test_group_by_key_gives_every_key_its_values_on_both_executors(tmp_path):
  chunks = [list(range(start, start + 10)) for start in range(0, 50, 10)]
  reference = {}
  for x in range(50):
    if x % 7:
      reference.setdefault((x % 7, bytes([x % 2])), []).append(x)
  beam = beam_pipeline.BeamExecutor(runner="DirectRunner", staging_dir=str(tmp_path / "staging"), progress=False)
  for executor in (executors.InProcessExecutor(progress=False), beam):
    found = executor.group_by_key("residues", _emit_residues, _reduce_residue, iter(chunks),
                                  sizes=[10] * len(chunks), shared=7)
    assert sorted(found) == sorted(reference.items())
  # The shuffle is counted: each chunk's pairs, one pickled batch per output shard (5 shards, one per chunk).
  shuffled = 0
  for chunk in chunks:
    batches = collections.defaultdict(list)
    for key, value in _emit_residues(chunk, 7):
      batches[beam_pipeline.shard_of(key, len(chunks))].append((key, value))
    shuffled += sum(len(pickle.dumps(pairs, protocol=pickle.HIGHEST_PROTOCOL)) for pairs in batches.values())
  assert beam.shuffle_bytes == shuffled
  assert beam.group_by_key("nothing", _emit_residues, _reduce_residue, [], sizes=[], shared=7) == []
  assert not list((tmp_path / "staging").iterdir())
