"""Cached frozen-tower outputs as an input source of the one trainer (data.input='tower_features').

The features source must be the same input as records when the towers are frozen (same model,
same loss), resume exactly, pass the head options through, train the info_nce objective, give
the "frozen pretrained" row and select the checkpoint on validation rows.
"""
import copy
import csv
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import tiny
from input_pipeline import images as images_lib
from oclear_jax import config_schema
from oclear_jax import run_data
from oclear_jax.commands import train as train_command
from oclear_jax.train import pretrained_towers
from oclear_jax import sharding
from oclear_jax.features import tower_features
from oclear_jax.train.evaluators import scoring
from oclear_jax.train import batch_formats
from oclear_jax.train import input_sources
from oclear_jax.train import trainer
from oclear_jax.retrieval import evaluation
from oclear_jax.heads import info_nce
from oclear_jax.features import feature_cache
import trained_state


def _records_task(task):
  """The same task reading records batches (raw images and title ids): the independent reference."""
  records = copy.copy(task)
  records.batch_format = batch_formats.RecordsFormat(task.config, task.model)
  return records


def _config(fusion="image_only", **head):
  """tiny, on frozen pretrained Lite0 (and MiniLM unless image_only) at 32 px, trained on their cached outputs."""
  config = tiny.get_config()
  m = config.model
  m.image_tower, m.image_pretrained, m.freeze_image_tower, m.fusion = "efficientnet_lite0", True, True, fusion
  if fusion != "image_only":
    m.text_tower, m.text_pretrained, m.freeze_text_tower = "minilm", True, True
    config.data.tokenizer = "minilm"
  config.data.input = "tower_features"
  config.head.update(head)
  config.train.update(dict(num_steps=8, checkpoint_every=4, log_every=4, async_checkpoints=False))
  config.eval.update(dict(at_start=False, scann=False, contact_sheet_queries=0))
  config.optimizer.warmup_steps = 2
  return config


def _numpy_info_nce(q, d, scale):
  """Hand-written symmetric InfoNCE: -log softmax at the diagonal, both directions, in float64."""
  logits = scale * q.astype(np.float64) @ d.astype(np.float64).T

  def ce(z):
    z = z - z.max(axis=1, keepdims=True)
    return -np.diag(z - np.log(np.exp(z).sum(axis=1, keepdims=True))).mean()
  return 0.5 * (ce(logits) + ce(logits.T))


def _numpy_cosface(emb, labels, centers, scale, margin):
  """Dense CosFace cross-entropy over all (real) class centres, float64."""
  e = emb.astype(np.float64) / np.linalg.norm(emb, axis=1, keepdims=True)
  c = centers.astype(np.float64) / np.linalg.norm(centers, axis=1, keepdims=True)
  logits = e @ c.T
  logits[np.arange(len(labels)), labels] -= margin
  logits *= scale
  logits -= logits.max(axis=1, keepdims=True)
  return -(logits[np.arange(len(labels)), labels] - np.log(np.exp(logits).sum(axis=1))).mean()


class _Setup:
  """Prepared data, cached features, a task and its state (pretrained towers loaded) for a config."""

  def __init__(self, config, workdir, devices=None):
    config_schema.validate(config)
    self.config = config
    self.prepared = run_data.prepare_data(config.data, str(workdir), seed=config.seed, progress=False)
    self.splits = tower_features.load_feature_splits(config, self.prepared, str(workdir), progress=False)
    self.task = trainer.OclearTask(config, sharding.make_mesh(config.mesh.shape, devices),
                                   num_classes=self.prepared.num_classes, vocab_size=self.prepared.vocab_size,
                                   title_special_ids=self.prepared.title_special_ids)
    _, self.shardings = self.task.abstract_state()
    state = self.task.init_state(jax.random.key(0), self.shardings)
    self.state = pretrained_towers.load_pretrained_into_state(state, self.shardings, config.model)

  def place(self, batch):
    return sharding.global_batch(batch, self.task.mesh, self.task.rules)

  def features_batch(self, rows, split="train"):
    s = self.splits[split]
    return {**s.table.device_batch(rows), "label": s.labels[rows], "kind": s.kinds[rows]}

  def loss(self, params, batch, task=None):
    task = task or self.task
    with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
      return float(jax.jit(task.loss_fn)(params, self.place(batch), jax.random.key(3))[0])


def _numpy_title_loss(expected, titles, present, scale, margin):
  """Title matching by hand: per titled row i, CosFace CE of G_i over the titled rows' F_j, same-title rows
  j != i left out; float64. (loss, top-1 accuracy)."""
  expected, titles = expected.astype(np.float64), titles.astype(np.float64)
  losses, hits = [], []
  for i in np.flatnonzero(present):
    cols = [j for j in np.flatnonzero(present) if j == i or titles[i] @ titles[j] < 1 - 1e-5]
    cos = np.asarray([expected[i] @ titles[j] for j in cols])
    own = cols.index(i)
    logits = scale * (cos - margin * (np.arange(len(cols)) == own))
    logits -= logits.max()
    losses.append(-(logits[own] - np.log(np.exp(logits).sum())))
    hits.append(np.argmax(cos) == own)
  return float(np.mean(losses)), float(np.mean(hits))


def test_features_loss_equals_the_records_loss_of_the_same_state(tmp_path):
  """The independent reference for "cached features are the same input": frozen towers run in the loss.

  With title matching on (models/title_match.py), and both losses also against numpy: CosFace on the
  served embeddings' image parts plus the title-matching loss on their title parts.
  """
  config = _config(fusion="gated", scale=30.0, margin_value=0.2)
  config.model.update(dict(title_match_dim=8, title_dropout=0.0))
  config.mesh.shape = (2, 1)  # MiniLM's 22M parameters: two devices keep the init quick
  setup = _Setup(config, tmp_path, jax.devices()[:2])
  # Move G off its zero start (as a first training step does), so the title parts are not all 0.
  params = dict(setup.state["params"])
  params["encoder"] = jax.tree.map(np.asarray, params["encoder"])
  kernel = params["encoder"]["title_match"]["from_image"]["kernel"]
  params["encoder"]["title_match"]["from_image"]["kernel"] = np.random.default_rng(1).normal(
      size=kernel.shape).astype(np.float32)
  setup.state = {**setup.state, "params": params}
  train = setup.splits["train"]
  rows = np.arange(8)
  tokenizer = run_data.title_tokenizer(config.data, [])
  records_batch = dict(
      image=np.stack([images_lib.load_image(p, config.data.stored_image_size) for p in train.image_paths[rows]]),
      title_tokens=np.asarray(tokenizer.encode_batch(train.titles[rows].tolist(), config.data.max_title_len)),
      label=train.labels[rows], kind=train.kinds[rows])
  assert train.table.present[rows].any()  # titles take part
  from_features = setup.loss(setup.state["params"], setup.features_batch(rows))
  from_records = setup.loss(setup.state["params"], records_batch, _records_task(setup.task))
  assert np.isfinite(from_features)
  np.testing.assert_allclose(from_features, from_records, rtol=2e-5)

  batch = setup.features_batch(rows)
  with jax.set_mesh(setup.task.mesh), nn.logical_axis_rules(setup.task.rules):
    out = jax.device_get(setup.task.jit_predict()(params, setup.place(batch)))
  e = config.model.embed_dim
  assert out["query"].shape == out["doc"].shape == (len(rows), e + 8)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  centers = np.asarray(params["class_centers"])[:setup.prepared.num_classes]
  labels = train.labels[rows]
  class_loss = _numpy_cosface(np.concatenate([out["query"][:, :e], out["doc"][:, :e]]),
                              np.concatenate([labels, labels]), centers, 30.0, 0.2)
  title_loss, _ = _numpy_title_loss(unit(out["query"][:, e:]), unit(out["doc"][:, e:]), batch["present"], 30.0, 0.2)
  np.testing.assert_allclose(from_features, class_loss + title_loss, rtol=1e-4)


def test_head_options_pass_through_and_match_the_dense_reference(tmp_path):
  setup = _Setup(_config(), tmp_path)
  rows = np.arange(16)
  batch = setup.features_batch(rows)
  params = setup.state["params"]
  head = setup.config.head
  # Dense numpy CosFace on the model's own embeddings (both views of every row).
  with jax.set_mesh(setup.task.mesh), nn.logical_axis_rules(setup.task.rules):
    out = setup.task.jit_predict()(params, setup.place(batch))
  emb = np.concatenate([np.asarray(out["query"]), np.asarray(out["doc"])])
  labels = np.concatenate([batch["label"], batch["label"]])
  centers = np.asarray(params["class_centers"])[:setup.prepared.num_classes]
  dense = _numpy_cosface(emb, labels, centers, head.scale, head.margin_value)
  plain = setup.loss(params, batch)
  np.testing.assert_allclose(plain, dense, rtol=1e-5)
  # Chunked (more padded classes: zero centres there are masked out) and bf16: the same loss.
  for options, rtol in ((dict(chunk_size=2), 1e-5), (dict(chunk_size=2, dtype="bfloat16"), 2e-2)):
    config = _config(**options)
    task = trainer.OclearTask(config, setup.task.mesh, num_classes=setup.prepared.num_classes,
                              vocab_size=setup.prepared.vocab_size)
    assert task.padded_classes > setup.task.padded_classes
    padded = np.zeros((task.padded_classes, config.model.embed_dim), np.float32)
    padded[:len(centers)] = centers
    np.testing.assert_allclose(setup.loss({**params, "class_centers": padded}, batch, task), dense, rtol=rtol)


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  q, d = rng.normal(size=(2, 12, 8)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  for scale in (1.0, 20.0):
    np.testing.assert_allclose(float(info_nce.info_nce_loss(q, d, scale)), _numpy_info_nce(q, d, scale), rtol=1e-5)
  eye = np.eye(8, dtype=np.float32)  # perfectly aligned, well separated pairs: a loss near 0
  assert float(info_nce.info_nce_loss(eye, eye, 100.0)) < 1e-6


def test_info_nce_objective_in_the_task_matches_numpy(tmp_path):
  config = _config(loss="info_nce", temperature=0.1)
  setup = _Setup(config, tmp_path)
  params = setup.state["params"]
  assert "class_centers" not in params  # no class centres: a learned log(1 / temperature)
  np.testing.assert_allclose(np.exp(float(params["logit_scale_log"])), 10.0, rtol=1e-6)
  batch = setup.features_batch(np.arange(16))
  with jax.set_mesh(setup.task.mesh), nn.logical_axis_rules(setup.task.rules):
    out = setup.task.jit_predict()(params, setup.place(batch))
  want = _numpy_info_nce(np.asarray(out["query"]), np.asarray(out["doc"]), 10.0)
  np.testing.assert_allclose(setup.loss(params, batch), want, rtol=1e-5)


def test_batches_are_epochs_of_permutations_indexed_by_step():
  n, batch = 10, 4
  rows = np.concatenate([input_sources.epoch_rows(n, batch, 7, step) for step in range(1, 6)])  # 20 = 2 epochs
  assert sorted(rows[:10]) == sorted(rows[10:]) == list(range(n))
  np.testing.assert_array_equal(input_sources.epoch_rows(n, batch, 7, 4), rows[12:16])  # O(1) jump to step 4
  assert not np.array_equal(input_sources.epoch_rows(n, batch, 8, 1), rows[:4])


def _final_state(config, workdir, **kwargs):
  _, state, step = trained_state.restore_trained_state(config, workdir, **kwargs)
  return step, jax.device_get(state)


def test_features_training_resumes_exactly_with_head_options(tmp_path):
  """Partial FC (sampled per step), chunking and a bf16 head; stopped mid-run, bitwise equal; frozen row."""
  config = _config(chunk_size=2, partial_fc_rate=0.5, dtype="bfloat16")
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
  broken = str(tmp_path / "broken")
  assert trainer.train_and_evaluate(config, broken, progress=False, stop_at_step=5)["final_step"] == 5
  resumed = trainer.train_and_evaluate(config, broken, progress=False)
  (step_a, a), (step_b, b) = _final_state(config, str(tmp_path / "straight")), _final_state(config, broken)
  assert step_a == step_b == 8
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  losses = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl", encoding="utf-8")]
  assert all(np.isfinite(r["train/loss"]) for r in losses if "train/loss" in r)
  assert straight["eval"][8] == resumed["eval"][8]
  # The frozen row: the cached pooled Lite0 features of the eval rows, cosine, by the same evaluator.
  setup_splits = tower_features.load_feature_splits(config, run_data.prepare_data(
      config.data, str(tmp_path / "straight"), progress=False), str(tmp_path / "straight"), progress=False)
  s = setup_splits["eval"]
  emb = s.table.image_pooled / np.linalg.norm(s.table.image_pooled, axis=1, keepdims=True)
  want = evaluation.search_and_score(evaluation.EvalSet(s.ids, s.labels, s.kinds, s.titles, emb, emb),
                                    ks=tuple(config.eval.ks), use_scann=False,
                                    cutoffs=tuple(config.eval.cutoffs)).metrics
  with open(tmp_path / "straight" / "eval" / "frozen.json", encoding="utf-8") as f:
    assert json.load(f)["metrics"] == pytest.approx(want)
  assert straight["frozen"] == pytest.approx(want)
  table = train_command.results_table({8: straight["eval"][8]}, (1, 5), frozen=straight["frozen"])
  assert "frozen pretrained" in table.splitlines()[2] and f"{want['recall@1']:.3f}" in table.splitlines()[2]


def test_checkpoint_selection_keeps_the_best_validation_step(tmp_path, monkeypatch):
  """A planted validation curve peaking at step 4: best.json and checkpoints_best/ hold step 4."""
  config = _config()
  config.train.update(dict(checkpoint_every=2, keep_checkpoints=1))
  config.eval.update(dict(every=2, select_on="val"))
  # The built-in catalogue with a few training products moved to a 'val' split.
  source = tmp_path / "catalogue"
  run_data.generate_builtin_catalogue(config.data, str(tmp_path / "gen"), progress=False)
  os.rename(tmp_path / "gen" / "catalogue", source)
  with open(source / "catalogue.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  train_labels = sorted({r["label"] for r in rows if r["split"] == "train"})
  val_labels = set(train_labels[::5])
  for r in rows:
    if r["label"] in val_labels:
      r["split"] = "val"
  with open(source / "catalogue.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  config.data.source, config.data.root = "csv", str(source)

  planted = {0: 0.1, 2: 0.2, 4: 0.9, 6: 0.3, 8: 0.5}
  real_evaluate = scoring.evaluate
  seen = []

  def evaluate(*args, split="eval", **kwargs):
    metrics = real_evaluate(*args, split=split, **kwargs)
    if split == "val":
      seen.append(kwargs["step"])
      metrics = {**metrics, "map@r": planted[kwargs["step"]]}
    return metrics
  monkeypatch.setattr(scoring, "evaluate", evaluate)
  workdir = str(tmp_path / "run")
  result = trainer.train_and_evaluate(config, workdir, progress=False)
  assert seen == [0, 2, 4, 6, 8]  # step 0, every eval.every steps and the last
  assert result["best"]["step"] == 4
  with open(os.path.join(workdir, "eval", "best.json"), encoding="utf-8") as f:
    best = json.load(f)
  assert best["step"] == 4 and best["value"] == 0.9 and best["history"] == {str(k): v for k, v in planted.items()}
  assert os.path.exists(os.path.join(workdir, "eval", "val", "step_4.json"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["8"]  # keep 1: step 4 is gone there ...
  step, state = _final_state(config, workdir, best=True)  # ... but kept apart
  assert step == 4 and int(state["step"]) == 4


@pytest.mark.parametrize("change, message", [
    (dict(freeze_image_tower=False), r"data.input='tower_features' .* freeze_image_tower=False"),
    (dict(image_tower="vit", image_pretrained=False, freeze_image_tower=False), r"image_tower='vit'"),
])
def test_validate_refuses_features_without_frozen_pretrained_towers(change, message):
  config = _config()
  config.model.update(change)
  with pytest.raises(ValueError, match=message):
    config_schema.validate(config)


def test_validate_names_the_other_new_keys():
  for key, value, message in (("head.loss", "triplet", "head.loss='triplet'"),
                              ("data.input", "pixels", "data.input='pixels'"),
                              ("eval.select_on", "eval", "eval.select_on='eval'")):
    config = _config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
      config_schema.validate(config)
  config = _config(loss="info_nce")
  config.train.both_views = False
  with pytest.raises(ValueError, match="both_views=True"):
    config_schema.validate(config)
  config = _config(fusion="gated")
  config.model.freeze_text_tower = False
  with pytest.raises(ValueError, match="freeze_text_tower=False"):
    config_schema.validate(config)


def test_served_embeddings_equal_the_cached_features_path(tmp_path):
  """A run trained on cached tower outputs serves (inference / --mode=embed) what it trained and scored on."""
  from oclear_jax.serving import trained_run  # pylint: disable=g-import-not-at-top
  config = _config()
  config.train.update(dict(num_steps=4, checkpoint_every=4))
  trainer.train_and_evaluate(config, str(tmp_path), progress=False)
  s = tower_features.load_feature_splits(config, run_data.prepare_data(config.data, str(tmp_path), progress=False),
                                         str(tmp_path), progress=False)["eval"]
  model = trained_run.restore_trained_model(config, str(tmp_path))
  images, kept, failed = images_lib.preprocess_image_files(list(s.image_paths), config.data)
  assert not failed and kept == list(range(len(s)))
  served = model.embedder("query", batch_size=-(-len(s) // 8) * 8)({"image": images, "title_tokens": model.tokenize([""] * len(s))})
  want = np.asarray(model.model.apply({"params": model.params}, s.table.image_pooled, method="queries_from_features"))
  np.testing.assert_allclose(served, want, atol=2e-5)
