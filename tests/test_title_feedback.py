"""Titles at search time: pseudo-relevance feedback re-ranking (retrieval/title_feedback.py)."""
import types

import jax
import numpy as np
import pytest

from configs import tiny
from oclear_jax import config_schema
from oclear_jax import sharding
from oclear_jax.train import input_sources
from oclear_jax.train.evaluators import scoring
from oclear_jax.train import trainer
from oclear_jax.retrieval import metrics as metrics_lib
from oclear_jax.retrieval import product1m_metrics
from oclear_jax.retrieval import evaluation
from oclear_jax.retrieval import title_feedback


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# Four titles: 0 and 2 are the same product (same title), 1 another one, 3 has no title.
T_A, T_B = _unit([1, 0, 0]), _unit([0.6, 0.8, 0])
TITLES = np.stack([T_A, T_B, T_A, np.zeros(3, np.float32)])


def _reference(scores, cands, titles, m, beta, temperature=0.1):
  """One query at a time, written straight from the formula."""
  out_s, out_c = [], []
  for s, c in zip(scores, cands):
    keep = [(float(x), int(d)) for x, d in zip(s, c) if d >= 0]
    keep.sort(key=lambda p: -p[0])  # stable: ties keep list order
    top = keep[:m]
    if top:
      w = np.exp([(x - top[0][0]) / temperature for x, _ in top])
      w = w / w.sum()
      t_bar = sum(wj * titles[d] for wj, (_, d) in zip(w, top))
      keep = [(x + beta * float(t_bar @ titles[d]), d) for x, d in keep]
    keep.sort(key=lambda p: -p[0])
    empty = [(float(x), int(d)) for x, d in zip(s, c) if d < 0]
    out_s.append([x for x, _ in keep + empty])
    out_c.append([d for _, d in keep + empty])
  return np.asarray(out_s, np.float32), np.asarray(out_c)


# == rerank ======================================================================================
def test_a_same_title_document_at_rank_3_moves_up_by_hand():
  scores = np.asarray([[0.90, 0.85, 0.80, 0.70]], np.float32)
  cands = np.asarray([[0, 1, 2, 3]])
  # m=1, beta=0.4: t_bar = t_A. Bonuses: 0.4, 0.4 * 0.6, 0.4, 0 (no title).
  s, c = title_feedback.rerank(scores, cands, TITLES, feedback_docs=1, weight=0.4)
  np.testing.assert_array_equal(c, [[0, 2, 1, 3]])
  np.testing.assert_allclose(s, [[1.30, 1.20, 0.85 + 0.24, 0.70]], rtol=1e-6)
  # m=3: w = softmax(10 * [0, -0.05, -0.1]), t_bar = (w0 + w2) t_A + w1 t_B.
  w = np.exp([0.0, -0.5, -1.0])
  w /= w.sum()
  t_bar = (w[0] + w[2]) * T_A + w[1] * T_B
  expected = scores[0] + 0.4 * (TITLES @ t_bar)
  s, c = title_feedback.rerank(scores, cands, TITLES, feedback_docs=3, weight=0.4)
  order = np.argsort(-expected, kind="stable")
  np.testing.assert_array_equal(c[0], order)
  np.testing.assert_allclose(s[0], expected[order], rtol=1e-6)
  assert c[0, 1] == 2  # the same-title document moved from rank 3 to rank 2


def test_off_returns_the_input_unchanged():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(5, 4)).astype(np.float32)
  cands = rng.integers(-1, 4, (5, 4))
  for kwargs in (dict(feedback_docs=0, weight=0.4), dict(feedback_docs=3, weight=0.0)):
    s, c = title_feedback.rerank(scores, cands, TITLES, **kwargs)
    assert s is scores and c is cands


def test_untitled_documents_get_no_bonus_and_empty_slots_stay_last():
  scores = np.asarray([[0.5, -np.inf, 0.9, 0.4, -np.inf], [-np.inf] * 5], np.float32)
  cands = np.asarray([[3, -1, 0, 2, -1], [-1] * 5])
  s, c = title_feedback.rerank(scores, cands, TITLES, feedback_docs=2, weight=1.0)
  np.testing.assert_array_equal(c, [[0, 2, 3, -1, -1], [-1] * 5])  # doc 2 (t_A) passes doc 3
  # Feedback: docs 0 (t_A) and 3 (untitled, contributes nothing but keeps its weight).
  w0 = 1.0 / (1.0 + np.exp(-4.0))
  np.testing.assert_allclose(s[0, :3], [0.9 + w0, 0.4 + w0, 0.5], rtol=1e-6)  # doc 3 keeps 0.5
  assert np.all(np.isneginf(s[0, 3:])) and np.all(np.isneginf(s[1]))


def test_matches_the_formula_on_random_lists_with_holes():
  rng = np.random.default_rng(1)
  titles = title_feedback.title_vectors(rng.normal(size=(30, 8)), rng.random(30) > 0.2, None)
  scores = rng.normal(size=(40, 12)).astype(np.float32)
  cands = np.stack([rng.permutation(30)[:12] for _ in range(40)])
  cands[rng.random(cands.shape) < 0.15] = -1
  scores[cands < 0] = -np.inf
  for m in (1, 3, 20):
    s, c = title_feedback.rerank(scores, cands, titles, feedback_docs=m, weight=0.4)
    ref_s, ref_c = _reference(scores, cands, titles, m, 0.4)
    np.testing.assert_array_equal(c, ref_c)
    np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-6)


def test_title_vectors_centre_normalise_and_zero_the_untitled():
  pooled = np.asarray([[2.0, 1.0], [1.0, 3.0], [5.0, 5.0]], np.float32)
  present = np.asarray([True, True, False])
  mean = title_feedback.title_mean(pooled, present)
  np.testing.assert_allclose(mean, [1.5, 2.0])
  t = title_feedback.title_vectors(pooled, present, mean)
  np.testing.assert_allclose(t[:2], _unit([[0.5, -1.0], [-0.5, 1.0]]), rtol=1e-6)
  np.testing.assert_array_equal(t[2], 0.0)
  assert title_feedback.title_mean(pooled, np.zeros(3, bool)) is None


# == search_and_score ============================================================================
def _eval_set(leave_one_out: bool, seed: int = 0):
  """Clustered image embeddings; titles shared by products (a noisy copy of the product direction)."""
  rng = np.random.default_rng(seed)
  classes, per, dim = 12, 4, 16
  centres = _unit(rng.normal(size=(classes, dim)))
  labels = np.repeat(np.arange(classes), per).astype(np.int32)
  emb = _unit(centres[labels] + 0.9 * rng.normal(size=(len(labels), dim)))
  kinds = np.zeros(len(labels), np.int32)
  if not leave_one_out:
    kinds[::per] = evaluation.QUERY
  title_dirs = rng.normal(size=(classes, 8))
  pooled = (title_dirs[labels] + 0.3 * rng.normal(size=(len(labels), 8)) + 2.0).astype(np.float32)
  present = rng.random(len(labels)) > 0.2
  es = evaluation.EvalSet(ids=np.asarray([f"r{i}" for i in range(len(labels))]), labels=labels, kinds=kinds,
                         titles=np.asarray(["t"] * len(labels)), query_emb=emb, doc_emb=emb)
  return es, title_feedback.title_vectors(pooled, present, title_feedback.title_mean(pooled, present))


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_search_and_score_reports_prf_metrics_equal_to_reranking_by_hand(leave_one_out):
  es, titles = _eval_set(leave_one_out)
  kwargs = dict(ks=(1, 5), use_scann=False, cutoffs=(10,))
  plain = evaluation.search_and_score(es, **kwargs)
  both = evaluation.search_and_score(es, title_vectors=titles, feedback_docs=3, feedback_weight=0.4, **kwargs)
  assert not any(k.startswith("prf/") for k in plain.metrics)
  assert {k: v for k, v in both.metrics.items() if not k.startswith("prf/")} == plain.metrics
  np.testing.assert_array_equal(both.retrieved, plain.retrieved)  # the returned ranking is the plain one

  gallery = titles[plain.gallery_rows]
  if leave_one_out:  # the candidate list never holds the query's own row, so neither does its feedback
    assert not np.any(plain.gallery_rows[plain.retrieved] == plain.query_rows[:, None])
  _, ranked = _reference(plain.scores, plain.retrieved, gallery, 3, 0.4)
  q_labels, g_labels = es.labels[plain.query_rows], es.labels[plain.gallery_rows]
  ids = (dict(query_ids=es.ids[plain.query_rows], gallery_ids=es.ids[plain.gallery_rows]) if leave_one_out
         else {})
  expected = {**metrics_lib.retrieval_metrics(ranked, q_labels, g_labels, ks=(1, 5), **ids),
              **product1m_metrics.product1m_metrics(ranked, q_labels, g_labels, (10,), **ids)}
  assert {"prf/recall@1", "prf/map@r"} <= set(both.metrics)
  for name, value in expected.items():
    np.testing.assert_allclose(both.metrics[f"prf/{name}"], value, rtol=1e-6, err_msg=name)
  assert both.metrics["prf/map@r"] != plain.metrics["map@r"]  # the titles did move something

  off = evaluation.search_and_score(es, title_vectors=titles, feedback_docs=0, **kwargs)
  assert off.metrics == plain.metrics


# == Config and the trainer's wiring =============================================================
def test_config_keys_and_validation():
  config = tiny.get_config()
  assert config.eval.title_feedback_docs == 0 and config.eval.title_feedback_weight == 0.4
  config_schema.validate(config)
  for key, value in (("title_feedback_docs", -1), ("title_feedback_weight", -0.1)):
    bad = tiny.get_config()
    bad.eval[key] = value
    with pytest.raises(ValueError, match=f"eval.{key}"):
      config_schema.validate(bad)


def _features(rng, n, present):
  return types.SimpleNamespace(table=types.SimpleNamespace(
      text_pooled=rng.normal(size=(n, 6)).astype(np.float32) + 3.0, present=present))


def test_tower_features_title_vectors_are_centred_by_the_gallerys_own_titles():
  """As a search over that gallery centres them (serving.gallery_index): the titled documents' mean, not the
  training split's nor the queries'."""
  config = tiny.get_config()
  config.data.input, config.model.fusion = "tower_features", "gated"
  config.eval.title_feedback_docs = 3
  rng = np.random.default_rng(0)
  splits = {"train": _features(rng, 20, rng.random(20) > 0.3), "eval": _features(rng, 7, np.arange(7) != 2)}
  inputs = input_sources.TowerFeaturesInput.__new__(input_sources.TowerFeaturesInput)
  inputs.splits = splits  # the cached tables alone: what title_vectors reads
  kinds = np.asarray([evaluation.QUERY, evaluation.DOC, evaluation.DOC, evaluation.DOC, evaluation.QUERY,
                      evaluation.DOC, evaluation.DOC])
  got = scoring.title_vectors(config, inputs, types.SimpleNamespace(kinds=kinds), "eval")
  rows = splits["eval"].table
  gallery = (kinds == evaluation.DOC) & rows.present
  mean = rows.text_pooled[gallery].mean(axis=0)
  np.testing.assert_allclose(got[np.arange(7) != 2], _unit(rows.text_pooled - mean)[np.arange(7) != 2], rtol=1e-5)
  np.testing.assert_array_equal(got[2], 0.0)
  config.model.fusion = "image_only"  # no text tower: no feedback
  assert scoring.title_vectors(config, inputs, None, "eval") is None
  config.model.fusion, config.eval.title_feedback_docs = "gated", 0
  assert scoring.title_vectors(config, inputs, None, "eval") is None


def test_records_titles_come_from_the_text_tower_and_are_zero_without_a_title():
  config = tiny.get_config()
  config.eval.title_feedback_docs = 3
  assert config.model.fusion != "image_only"
  task = trainer.OclearTask(config, sharding.make_mesh(config.mesh.shape), num_classes=6, vocab_size=300)
  _, shardings = task.abstract_state()
  params = task.init_state(jax.random.key(0), shardings)["params"]
  rng = np.random.default_rng(0)
  ids = np.zeros((8, config.data.max_title_len), np.int32)
  ids[:, 0], ids[:, 1:5], ids[:, 5] = 2, rng.integers(4, 300, (8, 4)), 3
  ids[3] = 0  # no title
  batch = sharding.global_batch({"title_tokens": ids}, task.mesh, task.rules)
  pooled = np.asarray(scoring.jit_title_pooled(task, params)(batch))
  _, expected, _ = task.model.apply({"params": jax.device_get(params["encoder"])}, ids,
                                    method=lambda m, x: m.text_encoder(x, train=False))
  keep = np.arange(8) != 3
  np.testing.assert_allclose(pooled[keep], np.asarray(expected)[keep], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(pooled[3], 0.0)
  assert np.all(np.abs(pooled[keep]).sum(axis=1) > 0)

  es = evaluation.EvalSet(ids=np.arange(8).astype(str), labels=np.arange(8) % 3, kinds=np.zeros(8, np.int32),
                         titles=np.asarray(["t"] * 8), query_emb=np.zeros((8, 2)), doc_emb=np.zeros((8, 2)),
                         title_pooled=pooled)
  got = scoring.title_vectors(config, input_sources.RecordsInput(config, None, None), es, "eval")
  mean = pooled[keep].mean(axis=0)  # the gallery's own titles
  np.testing.assert_allclose(got[keep], _unit(pooled[keep] - mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[3], 0.0)
