"""Title matching (models/title_match_loss.py, heads/title_match_loss.py): an image-only query meets its document's title.

Here: the loss against a hand-written numpy loop, and the configs that cannot work, refused by name.
Elsewhere: the task's loss against numpy CosFace plus that loop on the served embeddings, records
and cached features alike (test_frozen_features.py); step 0 against the bare pretrained tower
(test_identity_head.py); `--mode=embed` widths and norms (test_embed_command.py).
"""
import numpy as np
import pytest

from oclear_jax import config_schema
from oclear_jax.heads import margins
from oclear_jax.heads import title_match_loss
from test_frozen_features import _config, _numpy_title_loss
from test_identity_head import _task

SCALE, MARGIN = 30.0, 0.2


def test_loss_matches_numpy_with_shared_and_missing_titles():
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  expected, titles = unit(rng.normal(size=(12, 6))), unit(rng.normal(size=(12, 6)))
  titles[[3, 7]] = titles[0]  # three rows share one title: none is another's negative
  present = np.ones(12, bool)
  present[[5, 9]] = False  # untitled rows: neither a class nor a negative
  margin_fn = margins.make_margin("cosface", scale=SCALE, margin=MARGIN)
  loss, accuracy = title_match_loss.title_match_loss(expected, titles, present, margin_fn)
  want_loss, want_accuracy = _numpy_title_loss(expected, titles, present, SCALE, MARGIN)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(accuracy), want_accuracy)
  # A planted perfect match (each photo points at its own title) is classified right and costs ~0.
  perfect, _ = title_match_loss.title_match_loss(np.eye(6, dtype=np.float32), np.eye(6, dtype=np.float32),
                                            np.ones(6, bool), margins.make_margin("cosface", scale=64.0, margin=0.0))
  assert float(perfect) < 1e-6


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
