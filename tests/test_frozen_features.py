"""Heads trained on cached frozen features: InfoNCE against numpy, both objectives learn, centres sharded."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from oclear_jax import config_schema
from oclear_jax import frozen_features as ff


def _numpy_info_nce(q, d, scale):
  """Hand-written symmetric InfoNCE: -log softmax at the diagonal, both directions, in float64."""
  logits = scale * q.astype(np.float64) @ d.astype(np.float64).T

  def ce(z):
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.diag(log_softmax).mean()
  return 0.5 * (ce(logits) + ce(logits.T))


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  q, d = rng.normal(size=(2, 12, 8)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  for scale in (1.0, 20.0):
    np.testing.assert_allclose(float(ff.info_nce_loss(q, d, scale)), _numpy_info_nce(q, d, scale), rtol=1e-5)
  # Perfectly aligned, well separated pairs give a loss near 0.
  eye = np.eye(8, dtype=np.float32)
  assert float(ff.info_nce_loss(eye, eye, 100.0)) < 1e-6


def _clustered_table(num_classes=6, per_class=8, seed=0):
  """Products of a class share an image centre (plus noise) and a title vector."""
  rng = np.random.default_rng(seed)
  image_centres = rng.normal(size=(num_classes, 24))
  text_centres = rng.normal(size=(num_classes, 12))
  labels = np.repeat(np.arange(num_classes), per_class)
  n = len(labels)
  table = ff.FeatureTable(
      image_pooled=(image_centres[labels] + 0.7 * rng.normal(size=(n, 24))).astype(np.float32),
      text_pooled=(text_centres[labels] + 0.1 * rng.normal(size=(n, 12))).astype(np.float32),
      text_mask=np.ones((n, 4), bool), present=np.ones(n, bool))
  return table, labels


def _config(fusion="gated", steps=25):
  c = config_schema.base_config()
  m = c.model
  m.image_tower, m.text_tower, m.fusion = "efficientnet_lite0", "minilm", fusion
  m.embed_dim, m.head_hidden, m.title_dropout = 16, 32, 0.1
  c.data.tokenizer, c.data.max_title_len = "minilm", 4
  c.train.batch_size, c.train.num_steps = 16, steps  # 16 products -> 32 rows over the batch shards
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-3, 5
  c.head.scale = 16.0
  return c


def _class_recall_at_1(queries, docs, labels):
  scores = queries @ docs.T
  np.fill_diagonal(scores, -np.inf)  # leave-one-out
  return float((labels[scores.argmax(1)] == labels).mean())


@pytest.mark.parametrize("loss", ["oclear", "info_nce"])
def test_both_objectives_train_on_the_mesh(loss):
  table, labels = _clustered_table()
  num_classes = int(labels.max()) + 1
  config = _config()
  config.mesh.shape = (1, 2)  # 2 of conftest's 8 simulated CPU devices: centres split over 'model', quick compiles
  trainer = ff.HeadTrainer(config, ff.Objective(loss), num_classes=(num_classes, 2) if loss == "oclear" else 0,
                           devices=jax.devices()[:2])
  two_levels = np.stack([labels, labels % 2], axis=1)  # a fine and a coarse label per product
  params, history = trainer.fit(table, two_levels if loss == "oclear" else None, seed=0, log_every=10)
  assert history[-1]["loss"] < history[0]["loss"]
  assert np.isfinite([h["loss"] for h in history]).all()
  if loss == "oclear":
    # One set of centres per label level, each sharded over the mesh axes that 'classes' maps to.
    assert [c.shape[0] for c in params["class_centers"]] == [6, 2]  # 6 and 2 classes split evenly in 2 shards
    assert all(c.sharding.spec == P(("data", "model"), None) for c in params["class_centers"])
  queries = trainer.embed_queries(params, table, batch_size=16)
  docs = trainer.embed_documents(params, table, batch_size=16)
  assert queries.shape == docs.shape == (len(table), 16)
  np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, rtol=1e-5)
  assert _class_recall_at_1(queries, docs, labels) > 0.5


def test_batch_order_is_shared_and_labels_are_checked():
  table, labels = _clustered_table()
  a = ff.HeadTrainer(_config(steps=7), ff.Objective("oclear"), num_classes=6)
  b = ff.HeadTrainer(_config(steps=7), ff.Objective("info_nce"))
  np.testing.assert_array_equal(a.batch_order(len(table), 3), b.batch_order(len(table), 3))
  assert a.batch_order(len(table), 3).shape == (7, 16)
  with pytest.raises(ValueError, match="labels must lie"):
    a.fit(table, labels + 1)
  with pytest.raises(ValueError, match="num_classes >= 1"):
    ff.HeadTrainer(_config(), ff.Objective("oclear"), num_classes=0)
  with pytest.raises(ValueError, match="unknown"):
    ff.Objective("triplet")
