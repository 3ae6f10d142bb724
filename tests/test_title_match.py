"""Title matching (models/title_match.py, heads/title_match.py): an image-only query meets its document's title.

Checked against references: the loss against a hand-written numpy loop; the task's loss against
numpy CosFace on the image parts plus that loop on the title parts of the served embeddings; step
0 against the bare pretrained tower (queries' title parts start at zero, so the ranking is the
frozen tower's); and the configs that cannot work are refused by name.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest

from oclear_jax import config_schema
from oclear_jax import pretrained_towers
from oclear_jax.heads import margins
from oclear_jax.heads import title_match
from oclear_jax.models import efficientnet
from oclear_jax.weights import efficientnet_lite0
from test_frozen_features import _Setup, _config, _numpy_cosface
from test_identity_head import _cosines, _images, _task

SCALE, MARGIN = 30.0, 0.2


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_title_loss(expected, titles, present, scale, margin):
  """Per titled row i: CosFace CE of G_i over the titled rows' F_j, same-title rows j != i left out; float64."""
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


def test_loss_matches_numpy_with_shared_and_missing_titles():
  rng = np.random.default_rng(0)
  expected = _unit(rng.normal(size=(12, 6))).astype(np.float32)
  titles = _unit(rng.normal(size=(12, 6))).astype(np.float32)
  titles[[3, 7]] = titles[0]  # three rows share one title: none is another's negative
  present = np.ones(12, bool)
  present[[5, 9]] = False  # untitled rows: neither a class nor a negative
  margin_fn = margins.make_margin("cosface", scale=SCALE, margin=MARGIN)
  loss, accuracy = title_match.title_match_loss(expected, titles, present, margin_fn)
  want_loss, want_accuracy = _numpy_title_loss(expected, titles, present, SCALE, MARGIN)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(accuracy), want_accuracy)
  # A planted perfect match (each photo points at its own title) is classified right and costs ~0.
  perfect, _ = title_match.title_match_loss(np.eye(6, dtype=np.float32), np.eye(6, dtype=np.float32),
                                            np.ones(6, bool), margins.make_margin("cosface", scale=64.0, margin=0.0))
  assert float(perfect) < 1e-6


def test_task_loss_is_class_loss_on_image_parts_plus_title_loss_on_title_parts(tmp_path):
  config = _config(fusion="bounded", scale=SCALE, margin_value=MARGIN)
  config.model.update(dict(title_match_dim=8, title_match_weight=0.5, title_dropout=0.0))
  config.mesh.shape = (2, 1)
  setup = _Setup(config, tmp_path, jax.devices()[:2])
  params = dict(setup.state["params"])
  # Move G off its zero start (as one training step would) so the title parts are not trivially 0.
  encoder = jax.tree.map(np.asarray, params["encoder"])
  kernel = encoder["title_match"]["from_image"]["kernel"]
  encoder["title_match"]["from_image"]["kernel"] = np.random.default_rng(1).normal(size=kernel.shape).astype(np.float32)
  params["encoder"] = encoder
  rows = np.arange(16)
  batch = setup.features_batch(rows)
  assert batch["present"].any() and not batch["present"].all() or batch["present"].all()
  with jax.set_mesh(setup.task.mesh), nn.logical_axis_rules(setup.task.rules):
    out = jax.device_get(setup.task.jit_predict()(params, setup.place(batch)))
  e = config.model.embed_dim
  assert out["query"].shape == out["doc"].shape == (16, e + 8)
  np.testing.assert_allclose(np.linalg.norm(out["query"], axis=1), 1.0, rtol=1e-5)
  labels = setup.splits["train"].labels[rows]
  centers = np.asarray(params["class_centers"])[:setup.prepared.num_classes]
  class_loss = _numpy_cosface(np.concatenate([out["query"][:, :e], out["doc"][:, :e]]),
                              np.concatenate([labels, labels]), centers, SCALE, MARGIN)
  title_loss, _ = _numpy_title_loss(_unit(out["query"][:, e:]), _unit(out["doc"][:, e:]), batch["present"],
                                    SCALE, MARGIN)
  np.testing.assert_allclose(setup.loss(params, batch), class_loss + title_loss, rtol=1e-4)


def test_step0_with_title_matching_ranks_as_the_frozen_tower():
  task = _task(fusion="bounded", title_match_dim=16, title_match_weight=0.5)
  _, shardings = task.abstract_state()
  state = task.init_state(jax.random.key(0), shardings)
  state = pretrained_towers.load_pretrained_into_state(state, shardings, task.config.model)
  images = _images()
  titles = np.zeros((len(images), task.config.data.max_title_len), np.int32)
  titles[:, 0], titles[:, 1:5], titles[:, 5] = 2, np.arange(4, 8), 3
  titles[::3, 1:5] = 0  # some documents untitled
  out = jax.device_get(task.jit_predict()(state["params"], {"image": images, "title_tokens": titles}))
  params = jax.tree.map(np.asarray, efficientnet_lite0.load_params())
  _, pooled = jax.jit(efficientnet.EfficientNetLite0().apply)({"params": params}, images)
  frozen = _cosines(np.asarray(pooled))
  scores = out["query"] @ out["doc"].T  # query . doc = cos(images) / (1 + w) for every document at step 0
  np.testing.assert_allclose(scores * 1.5, frozen, atol=2e-5)
  np.testing.assert_array_equal(np.argsort(-scores, axis=1)[:, :4], np.argsort(-frozen, axis=1)[:, :4])
  np.testing.assert_array_equal(out["query"][:, efficientnet.HEAD_WIDTH:], 0.0)


@pytest.mark.parametrize("change, message", [
    (dict(fusion="image_only"), "image_only"),
    (dict(title_match_weight=0.0), "title_match_weight"),
])
def test_model_refuses_title_matching_it_cannot_do(change, message):
  with pytest.raises(ValueError, match=message):
    _task(**{"fusion": "bounded", "title_match_dim": 8, **change}).abstract_state()


def test_config_refuses_title_matching_without_both_views():
  config = _config(fusion="bounded")
  config.model.title_match_dim = 8
  config.train.both_views = False
  with pytest.raises(ValueError, match="both_views"):
    config_schema.validate(config)
