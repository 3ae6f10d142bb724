"""A run whose workdir is a URL: TensorFlow's in-memory ram:// stands in for a pod's gs:// bucket.

What each layer supports (checked here): tf.io.gfile (input_pipeline.paths, TFRecordWriter,
tf.summary) serves ram:// and gs://; etils.epath knows gs:// but not ram://; orbax's arrays go
through tensorstore, whose drivers are file and gcs only, so a ram:// checkpoint would land in a
local folder named `ram:`. The run below sends orbax's folders to a local directory (what a gs://
workdir does not need); all else is under ram://, ScaNN's folders too (ScaNN serializes to local
files: `ScannIndex.save` writes a temporary folder and copies it up, `load` copies it down).
"""
import csv
import io
import json
import os

import pytest
import tensorflow as tf

from configs import tiny
from oclear_jax import run_config
from oclear_jax import checkpoint as checkpoint_lib
from input_pipeline import paths
from oclear_jax.train import trainer

WORKDIR = "ram://remote_run"


def test_resolve_keeps_urls_and_makes_local_paths_absolute():
  assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
  assert paths.resolve("ram://x/y") == "ram://x/y"
  assert paths.resolve("runs/a") == os.path.join(os.getcwd(), "runs/a")
  assert paths.is_remote("gs://b") and not paths.is_remote("/tmp/gs:/b")


def test_paths_round_trip_through_ram():
  path = paths.join("ram://unit", "eval", "step_1.json")
  paths.makedirs(os.path.dirname(path))
  with paths.open(path, "w") as f:
    f.write("{}")
  paths.replace(path, path + ".moved")
  assert paths.listdir("ram://unit/eval") == ["step_1.json.moved"]


@pytest.fixture(scope="module")
def ram_run(tmp_path_factory):
  """4 steps of the tiny config with a ram:// workdir; orbax's folders mapped to a local one."""
  local = tmp_path_factory.mktemp("orbax")
  catalogue = tmp_path_factory.mktemp("catalogue")  # the synthetic generator writes local images
  config = tiny.get_config()
  config.mesh.shape = (4, 2)
  config.train.update(num_steps=4, checkpoint_every=4, log_every=2)
  config.data.root = str(catalogue)
  before = sorted(os.listdir(os.getcwd()))
  original = checkpoint_lib.orbax_directory
  to_local = lambda d: str(local / os.fspath(d).split("://", 1)[1]) if paths.is_remote(d) else original(d)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint_lib, "orbax_directory", to_local)
    result = trainer.train_and_evaluate(config, WORKDIR, progress=False)
    yield result, local, before, config, patch


def test_run_writes_its_files_under_the_url(ram_run):
  result, local, *_ = ram_run
  assert result["final_step"] == 4 and 4 in result["eval"]
  for name in ("config.json", "metrics.jsonl", "records/records.json", "records/labels.json",
               "records/catalogue_counts.json", "eval/step_0.json", "eval/step_4.json",
               "recall_at_k.png", "contact_sheet.png", "scann_index/oclear_index.json"):
    assert tf.io.gfile.exists(f"{WORKDIR}/{name}"), name
  assert tf.io.gfile.glob(f"{WORKDIR}/records/*.tfrecord*")
  assert tf.io.gfile.glob(f"{WORKDIR}/tensorboard/events.out.tfevents.*")
  assert "4" in os.listdir(local / "remote_run" / "checkpoints")


def test_nothing_lands_on_local_disk_under_the_scheme(ram_run):
  _, _, before, *_ = ram_run
  assert sorted(os.listdir(os.getcwd())) == before
  assert not os.path.exists("ram:") and not os.path.exists("gs:")


def test_saved_config_is_read_back_from_the_url(ram_run):
  """index/search/embed run on the config a training run saved: here, under ram://."""
  with tf.io.gfile.GFile(f"{WORKDIR}/config.json") as f:
    saved = json.load(f)
  config = run_config.load(WORKDIR)
  assert config.train.num_steps == saved["train"]["num_steps"] == 4
  assert list(config.mesh.shape) == list(saved["mesh"]["shape"]) == [4, 2]


def test_embed_reads_a_catalogue_and_writes_its_output_under_urls(ram_run, tmp_path):
  """--mode=embed with the catalogue (CSV and images) in a bucket and the output in one: the same
  vectors as the local copy gives, a missing image skipped and listed, nothing written locally."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from oclear_jax.commands import embed as embed_command  # pylint: disable=g-import-not-at-top
  *_, config, _ = ram_run
  with open(os.path.join(config.data.root, config.data.csv), newline="", encoding="utf-8") as f:
    header, *rows = list(csv.reader(f))[:13]
  images = [row[header.index(config.data.columns.image)] for row in rows]
  remote = "ram://catalogue_in_a_bucket"
  for name in images[1:]:  # the first row's image stays behind: missing in the bucket
    paths.makedirs(os.path.dirname(paths.join(remote, name)))
    tf.io.gfile.copy(os.path.join(config.data.root, name), paths.join(remote, name), overwrite=True)
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    os.symlink(os.path.join(config.data.root, name), tmp_path / name)
  for path, kept in ((f"{remote}/meta.csv", rows), (str(tmp_path / "meta.csv"), rows[1:])):
    with paths.open(path, "w") as f:
      f.write(_csv_text([header, *kept]))
  before = sorted(os.listdir(os.getcwd()))
  remote_manifest = embed_command.run(config, WORKDIR, f"{remote}/meta.csv", "ram://embedded", progress=False)
  embed_command.run(config, WORKDIR, str(tmp_path / "meta.csv"), str(tmp_path / "out"), progress=False)
  assert sorted(os.listdir(os.getcwd())) == before
  assert [s["reason"] for s in remote_manifest["skipped"]] == ["missing"]
  for name in (embed_command.QUERIES_FILE, embed_command.DOCUMENTS_FILE):
    with paths.open(f"ram://embedded/{name}", "rb") as f:
      got = np.load(f)
      got_ids, got_emb = got["ids"], got["emb"]
    want = np.load(tmp_path / "out" / name)
    np.testing.assert_array_equal(got_ids, want["ids"])
    np.testing.assert_allclose(got_emb, want["emb"], rtol=0, atol=1e-6)
  with paths.open(f"ram://embedded/{embed_command.MANIFEST}") as f:
    assert json.load(f)["counts"]["embedded"] == len(rows) - 1


def _csv_text(rows) -> str:
  buffer = io.StringIO()
  csv.writer(buffer).writerows(rows)
  return buffer.getvalue()


def test_index_and_search_on_a_url_workdir(ram_run):
  """--mode=index then --mode=search with the workdir under ram://: shards, manifest, image paths,
  frontier and the ScaNN folder (a tree, serialized locally and copied up, copied down to load) land
  in the bucket; search answers like exact search over the exported vectors; nothing is local."""
  import copy  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from oclear_jax.serving import export  # pylint: disable=g-import-not-at-top
  from oclear_jax.commands import search as search_command  # pylint: disable=g-import-not-at-top
  *_, config, _ = ram_run
  config = copy.deepcopy(config)
  # A ScaNN tree on the tiny gallery (not brute force), probing every leaf and re-scoring every
  # candidate: its answers are exact, so exact search is the reference; several shards per export.
  config.index.update(exact_max_documents=0, min_points_for_tree=16, target_recall=0.0, num_leaves=4,
                      num_leaves_to_search=4, reorder=100_000, shard_size=16)
  before = sorted(os.listdir(os.getcwd()))
  manifest = search_command.build_index(WORKDIR, config, progress=False, out=io.StringIO())
  index = f"{WORKDIR}/index"
  assert manifest["searcher"].startswith("ScaNN tree(4 leaves, search 4")
  for name in ("index.json", "image_paths.npy", "frontier.json", "frontier.png", "documents/manifest.json",
               "documents/shard-00001.vectors.npy", "queries/manifest.json", "scann/oclear_index.json",
               "scann/scann_assets.pbtxt"):
    assert tf.io.gfile.exists(f"{index}/{name}"), name
  with paths.open(f"{index}/documents/manifest.json") as f:
    shards = json.load(f)["shards"]
  assert len(shards) > 1 and all(
      tf.io.gfile.stat(f"{index}/documents/{export._shard_file(int(i), name)}").length == size  # pylint: disable=protected-access
      for i, entry in shards.items() for name, size in entry["files"].items())

  with open(os.path.join(config.data.root, config.data.csv), newline="", encoding="utf-8") as f:
    photos = [r for r in csv.DictReader(f) if r["kind"] == "query" and r["split"] == "eval"][:3]
  out = io.StringIO()
  payload = search_command.search(WORKDIR, [os.path.join(config.data.root, p["image"]) for p in photos],
                                  top_k=5, output_format="json", config=config, out=out)
  assert json.loads(out.getvalue()) == json.loads(json.dumps(payload))
  assert payload["searcher"] == manifest["searcher"] and payload["workdir"] == WORKDIR
  assert payload["contact_sheet"] == f"{WORKDIR}/search/contact_sheet.png"
  assert tf.io.gfile.stat(payload["contact_sheet"]).length > 0
  # Independent reference: the eval pipeline's embeddings of these photos (read back from the URL)
  # times every document vector, sorted in numpy.
  queries, docs = export.ExportedEmbeddings(f"{index}/queries"), export.ExportedEmbeddings(f"{index}/documents")
  q_row = {i: n for n, i in enumerate(queries.column("id").tolist())}
  scores = queries.vectors()[[q_row[p["id"].encode()] for p in photos]] @ docs.vectors().T
  for q, found in enumerate(payload["queries"]):
    order = np.argsort(-scores[q], kind="stable")[:5]
    assert [r["id"] for r in found["results"]] == [i.decode() for i in docs.column("id")[order]]
    np.testing.assert_allclose([r["score"] for r in found["results"]], scores[q, order], atol=1e-5)
  assert sorted(os.listdir(os.getcwd())) == before
  assert not os.path.exists("ram:") and not os.path.exists("gs:")
  # A rerun resumes from the bucket: every listed shard is kept, a deleted one is redone.
  settings = {k: docs.manifest[k] for k in ("format", "fingerprint", "total", "shard_size", "columns")}
  tf.io.gfile.remove(f"{index}/documents/shard-00001.vectors.npy")
  _, done = export._resume_state(f"{index}/documents", settings)  # pylint: disable=protected-access
  assert done == [i for i in range(len(shards)) if i != 1]
