"""--mode=index and --mode=search on a tiny trained run: what they find, what they write, how they fail.

The run uses shared query/document heads and image-only documents, so a catalogue image queried
against the index must find its own document first with cosine 1: that holds only if the query
file is preprocessed exactly as the records were (re-encode at the stored size, eval_preprocess).
"""
import csv
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import tiny
from oclear_jax import run_config
from oclear_jax.train import trainer
from oclear_jax.serving import export
from oclear_jax.commands import search as search_command

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """4 training steps with an evaluation at step 2 (mid-run) and 4, then the index."""
  workdir = str(tmp_path_factory.mktemp("search_run"))
  config = tiny.get_config()
  config.model.fusion = "image_only"
  config.model.shared_heads = True
  config.train.update(num_steps=4, checkpoint_every=4, log_every=2)
  config.eval.update(every=2, at_start=False, contact_sheet_queries=0)
  config.index.shard_size = 64  # several shards, so the rebuild test can tear one
  result = trainer.train_and_evaluate(config, workdir, progress=False)
  printed = io.StringIO()
  manifest = search_command.build_index(workdir, progress=False, out=printed)  # reads the saved config.json
  return workdir, result, manifest, printed.getvalue()


def _catalogue_rows(workdir, kind, split):
  with open(os.path.join(workdir, "catalogue", "catalogue.csv"), encoding="utf-8") as f:
    return [r for r in csv.DictReader(f) if r["kind"] == kind and r["split"] == split]


def _search_json(workdir, queries, top_k=5):
  out = io.StringIO()
  payload = search_command.search(workdir, queries, top_k=top_k, output_format="json", out=out)
  assert json.loads(out.getvalue()) == json.loads(json.dumps(payload))  # stdout is the payload, parseable
  return payload


def test_mid_run_eval_reports_product1m_metrics(run):
  workdir, result, _, _ = run
  assert sorted(result["eval"]) == [2, 4]
  with open(os.path.join(workdir, "eval", "step_2.json"), encoding="utf-8") as f:
    mid = json.load(f)
  for key in ("recall@1", "map@r", "prec@10", "map@10", "mar@10", "prec@100", "map@100", "mar@100"):
    assert 0.0 <= mid[key] <= 1.0, key
  # The eval gallery is smaller than 100: every query's top 100 holds all its positives, so mAR@100
  # is exactly 1, and Product1M's cut-off min(100, P) makes Prec@100 the R-precision (another code path).
  assert mid["num_gallery"] < 100
  assert mid["mar@100"] == pytest.approx(1.0)
  assert mid["prec@100"] == pytest.approx(mid["prec@r"])


def test_index_holds_the_whole_catalogue(run):
  workdir, _, manifest, printed = run
  with open(os.path.join(workdir, "records", "records.json"), encoding="utf-8") as f:
    counts = json.load(f)["counts"]
  assert manifest["num_documents"] == counts["train"]["doc"] + counts["eval"]["doc"]
  assert manifest["step"] == 4 and "brute force" in manifest["searcher"]
  assert manifest["scann_recall_vs_exact@10"] == 1.0  # brute force on a small gallery is exact
  assert "mar@10" in manifest["catalogue_metrics"]
  docs = export.ExportedEmbeddings(os.path.join(workdir, "index", "documents"))
  ids = docs.column("id")
  assert len(set(ids.tolist())) == len(ids) and set(docs.column("split").tolist()) == {b"train", b"eval"}
  np.testing.assert_allclose(np.linalg.norm(docs.vectors(), axis=1), 1.0, atol=1e-5)
  assert docs.num_shards > 1 and f"{manifest['num_documents']} documents" in printed


def test_a_catalogue_image_finds_its_own_document_first(run):
  workdir = run[0]
  doc = next(r for r in _catalogue_rows(workdir, "doc", "eval") if r["title"])
  payload = _search_json(workdir, [os.path.join(workdir, "catalogue", doc["image"])])
  top = payload["queries"][0]["results"]
  assert [r["rank"] for r in top] == [1, 2, 3, 4, 5]
  assert top[0]["id"] == doc["id"] and top[0]["title"] == doc["title"]
  assert top[0]["score"] == pytest.approx(1.0, abs=1e-4)
  assert top[1]["score"] < 1.0 - 1e-4
  sheet = payload["contact_sheet"]
  assert sheet == os.path.join(workdir, "search", "contact_sheet.png")
  with Image.open(sheet) as image:
    assert image.format == "PNG" and image.width >= 6 * 128  # the query and its 5 results


def test_query_photos_rank_like_brute_force_over_the_exported_vectors(run):
  workdir = run[0]
  photos = _catalogue_rows(workdir, "query", "eval")[:3]
  payload = _search_json(workdir, [os.path.join(workdir, "catalogue", p["image"]) for p in photos], top_k=7)
  # Independent reference: the eval pipeline's embeddings of these photos (index/queries), times
  # every document vector, sorted in numpy.
  queries = export.ExportedEmbeddings(os.path.join(workdir, "index", "queries"))
  docs = export.ExportedEmbeddings(os.path.join(workdir, "index", "documents"))
  q_row = {i: n for n, i in enumerate(queries.column("id").tolist())}
  scores = queries.vectors()[[q_row[p["id"].encode()] for p in photos]] @ docs.vectors().T
  doc_ids = docs.column("id")
  for q, found in enumerate(payload["queries"]):
    order = np.argsort(-scores[q], kind="stable")[:7]
    assert [r["id"] for r in found["results"]] == [i.decode() for i in doc_ids[order]]
    np.testing.assert_allclose([r["score"] for r in found["results"]], scores[q, order], atol=1e-5)


def test_table_output_lists_rank_id_title_score(run):
  workdir = run[0]
  doc = next(r for r in _catalogue_rows(workdir, "doc", "eval") if r["title"])
  out = io.StringIO()
  search_command.search(workdir, [os.path.join(workdir, "catalogue", doc["image"])], top_k=3, out=out)
  lines = out.getvalue().splitlines()
  header = next(i for i, line in enumerate(lines) if line.split() == ["rank", "score", "id", "title"])
  first = lines[header + 1].split(maxsplit=3)
  assert first[0] == "1" and first[2] == doc["id"] and first[3] == doc["title"]
  assert lines[-1].startswith("contact sheet: ")


def test_a_torn_shard_is_re_embedded_identically(run):
  workdir = run[0]
  directory = os.path.join(workdir, "index", "documents")
  before = export.ExportedEmbeddings(directory).vectors()
  kept = os.stat(os.path.join(directory, "shard-00000.vectors.npy")).st_mtime_ns
  os.remove(os.path.join(directory, "shard-00001.vectors.npy"))
  search_command.build_index(workdir, progress=False, out=io.StringIO())
  # Only shard 1 was redone (through the records pipeline's skip), and it came out the same.
  assert os.stat(os.path.join(directory, "shard-00000.vectors.npy")).st_mtime_ns == kept
  np.testing.assert_allclose(export.ExportedEmbeddings(directory).vectors(), before, atol=1e-6)


def test_bad_inputs_name_the_file(run, tmp_path):
  workdir = run[0]
  fake = tmp_path / "notes.jpg"
  fake.write_text("not a photo\n")
  with pytest.raises(ValueError, match="notes.jpg is not a usable image"):
    search_command.search(workdir, [str(fake)])
  with pytest.raises(FileNotFoundError, match="missing.jpg not found"):
    search_command.search(workdir, [str(tmp_path / "missing.jpg")])
  with pytest.raises(ValueError, match="top_k"):
    search_command.search(workdir, [str(fake)], top_k=0)
  with pytest.raises(FileNotFoundError, match="config.json"):
    search_command.search(str(tmp_path), [str(fake)])
  # A workdir with the run's config and records but no index, and no checkpoint.
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), bare / "config.json")
  shutil.copytree(os.path.join(workdir, "records"), bare / "records")
  photo = os.path.join(workdir, "catalogue", _catalogue_rows(workdir, "doc", "eval")[0]["image"])
  with pytest.raises(FileNotFoundError, match="--mode=index"):
    search_command.search(str(bare), [photo])
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    search_command.build_index(str(bare), progress=False)


def test_saved_config_is_read_back_and_unknown_keys_are_refused(run, tmp_path):
  workdir = run[0]
  config = run_config.load(workdir)
  assert config.model.fusion == "image_only" and config.index.shard_size == 64 and config.mesh.shape == (4, 2)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  saved["index"]["num_leafs"] = 10
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="unknown config key index.num_leafs"):
    run_config.load(str(tmp_path))


def test_command_line_error_is_one_line_with_exit_code_2(run, tmp_path):
  fake = tmp_path / "notes.png"
  fake.write_text("not a photo\n")
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-m", "oclear_jax.main", "--mode=search", f"--workdir={run[0]}",
                         f"--query={fake}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert f"error: query {fake} is not a usable image" in proc.stderr
  assert "Traceback" not in proc.stderr
