"""--mode=evaluate: a run and the frozen towers on a labelled catalogue, scored against numpy references.

One 4-step tiny run is trained for the module. The references are independent of the command's path:
the run's embeddings through `embed_catalogue` (the --mode=embed path), the frozen tower's pooled
features through the feature cache's own extractor, and Recall@K / MAP@R computed here by hand.
"""
import csv
import io
import json
import os

import numpy as np
import pytest

from configs import tiny
from oclear_jax import run_config
from oclear_jax.commands import evaluate as evaluate_command
from oclear_jax.features import feature_cache
from oclear_jax.serving import catalogue_embedding
from oclear_jax.serving import trained_run
from oclear_jax.train import trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("evaluate_run"))
  config = tiny.get_config()
  config.train.update(num_steps=4, checkpoint_every=4, log_every=2)
  config.eval.update(every=0, at_start=False, contact_sheet_queries=0, scann=False)
  trainer.train_and_evaluate(config, workdir, progress=False)
  return workdir


def _planted(workdir, path, *, kinds=False, unlabelled=0):
  """The run's catalogue under other column names, labels planted in groups of three rows; the first
  `unlabelled` rows lose their label; with `kinds`, every third row is a query."""
  with open(os.path.join(workdir, "catalogue", "catalogue.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))[:60]
  root = os.path.join(workdir, "catalogue")
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["sku", "photo", "name", "group"] + (["role"] if kinds else []))
    for i, r in enumerate(rows):
      label = "" if i < unlabelled else f"g{i // 3}"
      writer.writerow([f"p{i}", os.path.join(root, r["image"]), r["title"], label]
                      + (["query" if i % 3 == 0 else "doc"] if kinds else []))
  return str(path)


def _columns(config, kinds=False):
  config.data.columns.update(dict(id="sku", image="photo", title="name", label="group", kind="role" if kinds else ""))
  return config


def _reference(queries, docs, labels, *, query_rows, doc_rows, leave_one_out, ks=(1, 5, 10)):
  """Recall@K and Musgrave's MAP@R by hand: cosine, exact, the query's own row excluded."""
  recalls, aps = {k: [] for k in ks}, []
  for q in query_rows:
    gallery = [d for d in doc_rows if not (leave_one_out and d == q)]
    scores = np.asarray([queries[q] @ docs[d] for d in gallery])
    ranked = [gallery[j] for j in np.argsort(-scores, kind="stable")]
    relevant = np.asarray([labels[d] == labels[q] for d in ranked])
    r = int(relevant.sum())
    if r == 0:
      continue
    for k in ks:
      recalls[k].append(float(relevant[:k].any()))
    hits = np.cumsum(relevant[:r])
    aps.append(float(np.sum(relevant[:r] * hits / np.arange(1, r + 1)) / r))
  return {**{f"recall@{k}": np.mean(v) for k, v in recalls.items()}, "map@r": np.mean(aps)}


def test_the_runs_row_equals_numpy_on_its_embed_vectors(run, tmp_path, capsys):
  csv_path = _planted(run, tmp_path / "planted.csv", unlabelled=3)
  config = _columns(run_config.load(run).unlock())
  config.eval.title_feedback_docs = 3
  result = evaluate_command.run(config, run, csv_path, output=str(tmp_path / "out"), progress=False)
  # tiny's tower is not pretrained: no frozen row, nothing to weigh the run against
  assert [row["name"] for row in result["rows"]] == ["trained (step 4)"] and result["composition"] is None
  assert result["counts"]["skipped_empty_label"] == 3 and result["counts"]["embedded"] == 57
  assert result["leave_one_out"] and result["split"] == "all"

  embedded = catalogue_embedding.embed_catalogue(trained_run.restore_trained_model(config, run), csv_path,
                                                 with_label=True, progress=False)
  rows = range(len(embedded.ids))
  want = _reference(embedded.queries, embedded.documents, embedded.labels, query_rows=rows, doc_rows=rows,
                    leave_one_out=True)
  got = result["rows"][0]["metrics"]
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-6), key
  assert "prf/map@r" in got  # title feedback re-ranked the same lists
  with open(tmp_path / "out" / evaluate_command.RESULT_FILE, encoding="utf-8") as f:
    assert json.load(f)["rows"][0]["metrics"]["map@r"] == pytest.approx(want["map@r"], abs=1e-6)
  printed = capsys.readouterr().out
  assert "trained (step 4)" in printed and "+ title feedback re-ranking" in printed and "skipped 3 without" in printed


def test_query_rows_search_the_documents_only(run, tmp_path):
  csv_path = _planted(run, tmp_path / "kinds.csv", kinds=True)
  config = _columns(run_config.load(run).unlock(), kinds=True)
  result = evaluate_command.run(config, run, csv_path, output=str(tmp_path / "out"), progress=False)
  assert not result["leave_one_out"]
  embedded = catalogue_embedding.embed_catalogue(trained_run.restore_trained_model(config, run), csv_path,
                                                 with_label=True, progress=False)
  n = len(embedded.ids)
  want = _reference(embedded.queries, embedded.documents, embedded.labels, query_rows=range(0, n, 3),
                    doc_rows=[i for i in range(n) if i % 3], leave_one_out=False)
  for key, value in want.items():
    assert result["rows"][0]["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_frozen_towers_alone_equal_the_feature_cache_cosine(run, tmp_path):
  """No workdir: the pretrained EfficientNet-Lite0's pooled features, cosine, as the feature cache computes them."""
  csv_path = _planted(run, tmp_path / "frozen.csv")
  config = _columns(tiny.get_config())
  config.model.update(dict(image_tower="efficientnet_lite0", image_pretrained=True, freeze_image_tower=True,
                           fusion="image_only"))
  # data.input='tower_features': images load as the feature cache loads them (not re-encoded like records).
  config.data.update(input="tower_features", stored_image_size=64,
                     eval_preprocess="decode|resize(64)|value_range(-1, 1)",
                     train_preprocess="decode|resize(64)|value_range(-1, 1)")
  config.eval.scann = False
  result = evaluate_command.run(config, None, csv_path, output=str(tmp_path / "out"), progress=False)
  assert [row["name"] for row in result["rows"]] == ["frozen pretrained (pooled, cosine)"]
  with open(csv_path, encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  pooled = feature_cache.extract_features([r["photo"] for r in table], image_size=64, progress=False)["pooled"]
  unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  rows = range(len(table))
  want = _reference(unit, unit, [r["group"] for r in table], query_rows=rows, doc_rows=rows, leave_one_out=True)
  for key, value in want.items():
    assert result["rows"][0]["metrics"][key] == pytest.approx(value, abs=1e-5), key
  assert os.path.exists(tmp_path / "out" / evaluate_command.CONTACT_SHEET)


def test_the_runs_own_eval_split_is_the_default_and_bad_input_is_one_error(run, tmp_path):
  config = run_config.load(run)
  result = evaluate_command.run(config, run, None, progress=False)
  assert result["split"] == "eval" and result["counts"]["other_split"] > 0
  with pytest.raises(ValueError, match="no row of split 'nope'"):
    evaluate_command.run(config, run, None, split="nope", progress=False)
  with pytest.raises(ValueError, match="needs --output"):
    evaluate_command.run(config, None, _planted(run, tmp_path / "x.csv"), progress=False)


def test_search_re_ranks_as_the_eval_measured_and_takes_a_csv_of_queries(run, tmp_path):
  """The index keeps its documents' title vectors; search re-ranks the exact top-k by them, as prf/ scores it."""
  from oclear_jax.commands import search as search_command  # pylint: disable=g-import-not-at-top
  from oclear_jax.retrieval import title_feedback  # pylint: disable=g-import-not-at-top
  csv_path = _planted(run, tmp_path / "gallery.csv")
  config = _columns(run_config.load(run).unlock())
  config.eval.update(title_feedback_docs=3, title_feedback_weight=2.0)  # large: the order must change
  search_command.build_index(run, config, catalogue=csv_path, progress=False, out=io.StringIO())
  output = str(tmp_path / "results.jsonl")
  payload = search_command.search(run, [csv_path], top_k=5, config=config, output=output, out=io.StringIO())
  assert payload["title_feedback"] and len(payload["queries"]) == 60
  with open(output, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  assert [line["query"] for line in lines] == [q["query"] for q in payload["queries"]]

  trained = trained_run.restore_trained_model(config, run)
  embedded = catalogue_embedding.embed_catalogue(trained, csv_path, progress=False)
  titles = np.concatenate([trained.embedder("title")({"title_tokens": trained.tokenize(embedded.titles[s:s + 32])})
                           for s in range(0, 60, 32)])
  vectors = title_feedback.gallery_title_vectors(titles, np.ones(60, bool))
  scores = embedded.queries @ embedded.documents.T
  depth = max(5, *config.eval.ks, *config.eval.cutoffs)
  top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
  _, reranked = title_feedback.rerank(np.take_along_axis(scores, top, 1), top, vectors, feedback_docs=3, weight=2.0)
  got = [[embedded.ids.index(r["id"]) for r in line["results"]] for line in lines]
  np.testing.assert_array_equal(np.asarray(got), reranked[:, :5])
  assert (reranked[:, :5] != top[:, :5]).any()  # feedback moved something: the check can fail
