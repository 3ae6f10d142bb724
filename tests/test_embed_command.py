"""--mode=embed and params-only restore on a tiny trained run: any run applied to any catalogue.

One 4-step run is trained once for the module; everything else reads its checkpoint. The
reference for "same vectors" is the eval path: the trainer's full restored state (class centres
and optimizer state included) and `OclearTask.jit_predict` over the run's records.
"""
import csv
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from input_pipeline import images as images_lib
from oclear_jax import run_config
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax.serving import trained_run
from oclear_jax import sharding
from oclear_jax.train import trainer
from oclear_jax.commands import embed as embed_command
from oclear_jax.serving import catalogue_embedding
from oclear_jax.serving import export
from oclear_jax.commands import search as search_command
import trained_state

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step tiny run (gated image+title fusion, separate heads, title matching) with one checkpoint."""
  workdir = str(tmp_path_factory.mktemp("embed_run"))
  config = tiny.get_config()
  config.model.title_match_dim = 8  # embeddings are embed_dim + 8 wide, and unit once training moved G
  config.train.update(num_steps=4, checkpoint_every=4, log_every=2)
  config.eval.update(every=0, at_start=False, contact_sheet_queries=0, scann=False)
  trainer.train_and_evaluate(config, workdir, progress=False)
  return workdir


def _catalogue_rows(workdir):
  with open(os.path.join(workdir, "catalogue", "catalogue.csv"), encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _write_csv(path, header, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _main(*args):
  env = {**os.environ, "PYTHONPATH": str(REPO)}  # conftest's XLA_FLAGS: the same 8 CPU devices
  return subprocess.run([sys.executable, "-m", "oclear_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_only_encoder_params_are_read_so_other_labels_embed(run, tmp_path, monkeypatch):
  from orbax.checkpoint._src.serialization import type_handlers  # pylint: disable=g-import-not-at-top
  read = []
  deserialize = type_handlers.ArrayHandler.deserialize

  async def recording(self, infos, args=None):
    read.extend(info.name for info in infos)
    return await deserialize(self, infos, args)
  monkeypatch.setattr(type_handlers.ArrayHandler, "deserialize", recording)

  config = run_config.load(run)
  trained = trained_run.restore_trained_model(config, run)
  # The checkpoint holds class centres for the run's N classes (and Adam moments for them) ...
  store = checkpoint_lib.CheckpointStore(os.path.join(run, "checkpoints"), read_only=True)
  saved = store.item_metadata(4)
  store.close()
  num_classes = saved["params"]["class_centers"].shape[0]
  assert num_classes >= 8 and "opt_state" in saved
  # ... none of which was read: only params/encoder, and all of it.
  assert trained.step == 4 and "class_centers" not in trained.params
  assert read and all(name.startswith("params.encoder.") for name in read), read[:5]
  assert len(read) == len(jax.tree.leaves(trained.params))

  # A catalogue with labels the run never saw, and one with no label column at all.
  rows = _catalogue_rows(run)[:6]
  image = lambda r: os.path.join(run, "catalogue", r["image"])
  relabelled = _write_csv(tmp_path / "other_labels.csv", ["id", "image", "title", "label"],
                          [[r["id"], image(r), r["title"], f"new-{i}"] for i, r in enumerate(rows)])
  unlabelled = _write_csv(tmp_path / "no_labels.csv", ["id", "image", "title"],
                          [[r["id"], image(r), r["title"]] for r in rows])
  a = catalogue_embedding.embed_catalogue(trained, relabelled, progress=False)
  b = catalogue_embedding.embed_catalogue(trained, unlabelled, progress=False)
  assert a.ids == b.ids == [r["id"] for r in rows]
  np.testing.assert_array_equal(a.documents, b.documents)
  assert a.queries.shape == (6, config.model.embed_dim + config.model.title_match_dim)


def test_embed_equals_the_eval_path(run, tmp_path):
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  config = run_config.load(run)
  out = tmp_path / "out"
  printed = io.StringIO()
  manifest = embed_command.run(config, run, os.path.join(run, "catalogue", "catalogue.csv"), str(out),
                               progress=False, out=printed)
  rows = _catalogue_rows(run)
  queries, documents = np.load(out / "queries.npz"), np.load(out / "documents.npz")
  assert queries["ids"].tolist() == documents["ids"].tolist() == [r["id"] for r in rows]  # CSV order
  assert queries["emb"].dtype == documents["emb"].dtype == np.float32
  for emb in (queries["emb"], documents["emb"]):
    assert emb.shape[1] == config.model.embed_dim + config.model.title_match_dim
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  assert manifest["checkpoint_step"] == 4 and manifest["counts"]["embedded"] == len(rows)
  assert manifest["num_empty_titles"] == sum(not r["title"] for r in rows) > 0
  assert f"embedded {len(rows)} of {len(rows)} rows" in printed.getvalue()
  with open(out / "manifest.json", encoding="utf-8") as f:
    assert json.load(f)["config"]["model"]["fusion"] == config.model.fusion

  # The eval path: the trainer's full state, its predict function, the records' eval split.
  task, state, step = trained_state.restore_trained_state(config, run)
  assert step == 4
  place = lambda b: sharding.global_batch(b, task.mesh, task.rules)
  embedders = {head: export.device_embedder(task.jit_predict(), state["params"], place, config.eval.batch_size, head)
               for head in ("query", "doc")}
  row_of = {i: n for n, i in enumerate(queries["ids"].tolist())}
  compared = 0
  for batch in pipeline.make_dataset(os.path.join(run, "records"), "eval", batch_size=config.eval.batch_size,
                                     preprocess=config.data.eval_preprocess, shuffle=False, repeat=False,
                                     drop_remainder=False).as_numpy_iterator():
    rows_here = [row_of[i.decode()] for i in batch["id"]]
    np.testing.assert_allclose(embedders["query"](batch), queries["emb"][rows_here], atol=1e-5)
    np.testing.assert_allclose(embedders["doc"](batch), documents["emb"][rows_here], atol=1e-5)
    compared += len(rows_here)
  assert compared > 20


def test_command_line_skips_corrupt_images_and_reads_renamed_columns(run, tmp_path):
  rows = _catalogue_rows(run)
  titled = [r for r in rows if r["title"]][:3]
  untitled = next(r for r in rows if not r["title"])
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  image = lambda r: os.path.join(run, "catalogue", r["image"])
  # The catalogue names its columns sku / picture / name: overrides without --config rename them.
  table = [[titled[0]["id"], image(titled[0]), titled[0]["title"]],
           ["broken", str(corrupt), "a title"],
           [untitled["id"], image(untitled), ""],
           ["", image(titled[1]), "a row without id"],
           [titled[1]["id"], image(titled[1]), titled[1]["title"]],
           ["gone", str(tmp_path / "missing.jpg"), "no file"]]
  csv_path = _write_csv(tmp_path / "meta.csv", ["sku", "picture", "name"], table)
  out = tmp_path / "out"
  proc = _main("--mode=embed", f"--workdir={run}", f"--catalogue={csv_path}", f"--output={out}",
               "--config.data.columns.id=sku", "--config.data.columns.image", "picture",
               "--config.data.columns.title=name")
  assert proc.returncode == 0, proc.stderr[-3000:]
  expected_ids = [titled[0]["id"], untitled["id"], titled[1]["id"]]
  documents, queries = np.load(out / "documents.npz"), np.load(out / "queries.npz")
  assert documents["ids"].tolist() == queries["ids"].tolist() == expected_ids
  with open(out / "manifest.json", encoding="utf-8") as f:
    manifest = json.load(f)
  reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
  assert reasons.pop("broken") in ("corrupt", "not_an_image", "truncated")
  assert reasons == {"": "empty_id", "gone": "missing"}, manifest["skipped"]
  assert manifest["counts"] == {"rows_read": 6, "embedded": 3, "skipped": 3, "empty_titles": 1}
  assert manifest["config"]["data"]["columns"]["title"] == "name"

  # The untitled row's document is its image alone: what the model gives with an all-padding title.
  config = run_config.load(run)
  trained = trained_run.restore_trained_model(config, run)
  images, kept, failed = images_lib.preprocess_image_files([image(r) for r in (untitled, titled[0])], config.data)
  assert kept == [0, 1] and not failed
  padding = np.zeros((2, config.data.max_title_len), np.int32)
  image_only = trained.embedder("doc")({"image": images, "title_tokens": padding})
  np.testing.assert_allclose(documents["emb"][1], image_only[0], atol=1e-5)
  np.testing.assert_allclose(queries["emb"][1], trained.embedder("query")({"image": images})[0], atol=1e-5)
  # A titled row's document does read its title.
  assert not np.allclose(documents["emb"][0], image_only[1], atol=1e-4)


def test_missing_column_and_unknown_key_are_one_error_line(run, tmp_path):
  rows = _catalogue_rows(run)[:2]
  csv_path = _write_csv(tmp_path / "meta.csv", ["id", "image", "productName"],
                        [[r["id"], os.path.join(run, "catalogue", r["image"]), r["title"]] for r in rows])
  proc = _main("--mode=embed", f"--workdir={run}", f"--catalogue={csv_path}", f"--output={tmp_path / 'out'}")
  assert proc.returncode == 2
  assert f"error: catalogue {csv_path} has no column 'title'" in proc.stderr
  assert "config.data.columns.title" in proc.stderr and "Traceback" not in proc.stderr
  proc = _main("--mode=embed", f"--workdir={run}", f"--catalogue={csv_path}", f"--output={tmp_path / 'out'}",
               "--config.data.columns.titel=productName")
  assert proc.returncode == 2
  assert "error: unknown config key 'data.columns.titel'" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists()


def test_config_overrides_are_split_from_argv_and_applied(run):
  from oclear_jax import main  # pylint: disable=g-import-not-at-top
  argv = ["prog", "--mode=embed", "--config.data.columns.title=name", "--workdir=W", "--config.eval.batch_size",
          "16", "--noconfig.eval.scann"]
  kept, overrides = main.split_config_overrides(argv)
  assert kept == ["prog", "--mode=embed", "--workdir=W"]
  assert overrides == ["--config.data.columns.title=name", "--config.eval.batch_size", "16", "--noconfig.eval.scann"]
  assert main.split_config_overrides(["prog", "--config=configs/tiny.py", "--config.seed=3"]) == (
      ["prog", "--config=configs/tiny.py", "--config.seed=3"], [])  # config_flags' own job
  config = main.apply_config_overrides(run_config.load(run), overrides + ["--config.mesh.shape=(8, 1)"])
  assert (config.data.columns.title, config.eval.batch_size, config.eval.scann) == ("name", 16, False)
  assert config.mesh.shape == (8, 1)
  with pytest.raises(ValueError, match="unknown config key 'train.num_step'"):
    main.apply_config_overrides(run_config.load(run), ["--config.train.num_step=5"])
  with pytest.raises(ValueError, match="bad config override"):
    main.apply_config_overrides(run_config.load(run), ["--config.eval.batch_size=many"])


def test_index_accepts_a_catalogue(run, tmp_path):
  workdir = tmp_path / "run"  # a copy: the index replaces {workdir}/index
  workdir.mkdir()
  for name in ("config.json", "records", "checkpoints"):
    (shutil.copytree if os.path.isdir(os.path.join(run, name)) else shutil.copy)(os.path.join(run, name),
                                                                                  workdir / name)
  rows = [r for r in _catalogue_rows(run) if r["title"]][:40]
  csv_path = _write_csv(tmp_path / "meta.csv", ["id", "image", "title"],
                        [[r["id"], os.path.join(run, "catalogue", r["image"]), r["title"]] for r in rows])
  printed = io.StringIO()
  manifest = search_command.build_index(str(workdir), catalogue=csv_path, progress=False, out=printed)
  assert manifest["num_documents"] == 40 and manifest["catalogue"] == csv_path and not manifest["labelled"]
  assert "catalogue_metrics" not in manifest and "no retrieval metrics" in printed.getvalue()
  docs = export.ExportedEmbeddings(str(workdir / "index" / "documents"))
  assert [i.decode() for i in docs.column("id")] == [r["id"] for r in rows]
  payload = search_command.search(str(workdir), [os.path.join(run, "catalogue", rows[5]["image"])], top_k=3,
                                  output_format="json", out=io.StringIO())
  assert len(payload["queries"][0]["results"]) == 3 and payload["num_documents"] == 40


def test_an_unwritable_output_an_empty_or_binary_catalogue_fail_before_the_restore(run, tmp_path, monkeypatch):
  def restore(*args, **kwargs):
    raise AssertionError("restored (and so would embed) before checking its inputs and output")
  monkeypatch.setattr(trained_run, "restore_trained_model", restore)
  config = run_config.load(run)
  rows = _catalogue_rows(run)[:2]
  csv_path = _write_csv(tmp_path / "meta.csv", ["id", "image", "title"],
                        [[r["id"], os.path.join(run, "catalogue", r["image"]), r["title"]] for r in rows])
  existing = tmp_path / "a_file"
  existing.write_text("x")
  with pytest.raises(ValueError, match=r"--output=.*a_file is an existing file"):
    embed_command.run(config, run, csv_path, str(existing), progress=False)
  with pytest.raises(ValueError, match=r"--output=.*a_file/out cannot be written: NotADirectoryError"):
    embed_command.run(config, run, csv_path, str(existing / "out"), progress=False)
  header_only = _write_csv(tmp_path / "empty.csv", ["id", "image", "title"], [])
  with pytest.raises(ValueError, match=r"has no rows, only its header \(id, image, title\)"):
    embed_command.run(config, run, header_only, str(tmp_path / "out"), progress=False)
  binary = tmp_path / "photo.csv"
  binary.write_bytes((pathlib.Path(run) / "catalogue" / rows[0]["image"]).read_bytes())
  with pytest.raises(ValueError, match=r"is not a CSV file: it holds binary data") as error:
    embed_command.run(config, run, str(binary), str(tmp_path / "out"), progress=False)
  assert len(str(error.value)) < 300 and "\\x" not in str(error.value)
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_embed_falls_back_from_an_unreadable_newest_checkpoint_with_a_warning(run, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  (step,) = [int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()]
  shutil.copytree(workdir / "checkpoints" / str(step), workdir / "checkpoints" / str(step + 10))
  for path in (workdir / "checkpoints" / str(step + 10)).rglob("*"):
    if path.is_file() and path.stat().st_size > 64:
      path.write_bytes(path.read_bytes()[:32])  # torn: a newest step that cannot be read
  rows = _catalogue_rows(run)[:6]
  csv_path = _write_csv(tmp_path / "meta.csv", ["id", "image", "title"],
                        [[r["id"], os.path.join(run, "catalogue", r["image"]), r["title"]] for r in rows])
  config = run_config.load(run)
  fallback = embed_command.run(config, str(workdir), csv_path, str(tmp_path / "fallback"), progress=False)
  assert fallback["checkpoint_step"] == step
  assert f"warning: checkpoint step {step + 10} in {workdir}/checkpoints is unreadable" in capsys.readouterr().err
  assert (workdir / "checkpoints" / str(step + 10)).exists()  # a reader leaves it in place
  embed_command.run(config, run, csv_path, str(tmp_path / "reference"), progress=False)
  for name in (embed_command.QUERIES_FILE, embed_command.DOCUMENTS_FILE):
    np.testing.assert_array_equal(np.load(tmp_path / "fallback" / name)["emb"],
                                  np.load(tmp_path / "reference" / name)["emb"])
