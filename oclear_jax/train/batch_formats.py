"""How each input source's batch reaches the model: the one place that knows a batch's keys.

An input source (`input_sources.py`) yields host batches of its own shape; its `BatchFormat`
maps one on the device to the model's calls, so `OclearTask` (loss, predict) never looks at a
batch's keys:

* records: ``image`` (pixels) and ``title_tokens`` run the towers end to end;
* cached tower outputs: ``image_tokens`` / ``image_pooled`` and the cached text tower's
  ``text_tokens`` / ``text_pooled`` / ``text_mask`` / ``present`` skip the frozen towers;
* cached trunk maps: ``trunk`` runs the image tower's trainable top (blocks from
  `model.image_trainable_from`), the titles as for cached tower outputs.

Each format gives (query view, document view) of every row (`both_views`), each row through its
own kind's head (`own_view`, `train.both_views=False`), and which rows have a title.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from oclear_jax.models import TitleFeatures
from oclear_jax.models import title_present

Batch = dict[str, jax.Array]


class RecordsFormat:
  """Pixels and title ids: the whole model runs."""

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module):
    self.config, self.model = config, model

  def both_views(self, variables, batch: Batch, *, train: bool, rngs=None) -> tuple[jax.Array, jax.Array]:
    return self.model.apply(variables, batch["image"], batch["title_tokens"], train=train, rngs=rngs,
                            method="both_views")

  def own_view(self, variables, batch: Batch, *, rngs=None) -> jax.Array:
    return self.model.apply(variables, batch["image"], batch["title_tokens"], batch["kind"] == 1, train=True,
                            rngs=rngs)

  def present(self, batch: Batch) -> jax.Array:
    """bool[B]: the row has a title."""
    return title_present(batch["title_tokens"], self.model.title_special_ids)


class FeaturesFormat(RecordsFormat):
  """The frozen towers' cached outputs: only what comes after them runs."""

  def image_features(self, variables, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(image tokens, pooled) of the batch's rows."""
    del variables
    return batch["image_tokens"].astype(jnp.float32), batch["image_pooled"]

  def title(self, batch: Batch) -> TitleFeatures | None:
    if self.config.model.fusion == "image_only":
      return None
    return TitleFeatures(batch["text_tokens"].astype(jnp.float32), batch["text_pooled"], batch["text_mask"],
                         batch["present"])

  def both_views(self, variables, batch: Batch, *, train: bool, rngs=None) -> tuple[jax.Array, jax.Array]:
    image_tokens, image_pooled = self.image_features(variables, batch)
    queries = self.model.apply(variables, image_pooled, method="queries_from_features")
    documents = self.model.apply(variables, image_tokens, image_pooled, self.title(batch), train=train, rngs=rngs,
                                 method="documents_from_features")
    return queries, documents

  def own_view(self, variables, batch: Batch, *, rngs=None) -> jax.Array:
    return self.model.apply(variables, *self.image_features(variables, batch), self.title(batch),
                            batch["kind"] == 1, train=True, rngs=rngs, method="from_features")

  def present(self, batch: Batch) -> jax.Array:
    return batch["present"]


class TrunkFormat(FeaturesFormat):
  """Cached trunk maps: the image tower's top trains on them."""

  def image_features(self, variables, batch: Batch) -> tuple[jax.Array, jax.Array]:
    k = self.config.model.image_trainable_from
    return self.model.apply(variables, batch["trunk"], method=lambda m, a: m.image_encoder.top(a, k))
