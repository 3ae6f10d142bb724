"""Title matching: an image-only query says which title it expects; a document says which title it has.

A query photo has no title, so a title term on the document side alone (models/fusion.py) can only
move documents toward where their images already are. Title matching gives both sides a second,
small part of the embedding:

  query = [unit(query image embedding),    sqrt(w) * unit(G(image))] / sqrt(1 + w)
  doc   = [unit(document image embedding), sqrt(w) * unit(F(title))] / sqrt(1 + w)

so that query . doc = (cos(query image, document image) + w * cos(G(query photo), F(document title))) / (1 + w):
one vector per side still, searched by the same index. G reads the image tower's pooled features and
F the text tower's pooled title; `heads/title_match.title_match_loss` trains them with the batch's
titles as the classes (CLIP-like, margin softmax), so a title that no training product had still
gets a place G can point at: titles are made of brands, genders, colours and article types that
recur. An untitled document takes G(its own image) instead of F(title), i.e. it expects the title
its photo suggests. `w` = `model.title_match_weight`; k = `model.title_match_dim` (0: off, and the
embedding is the image part alone, as before).

G's kernel starts at zero, so at step 0 every query's title part is 0 and query . doc is
cos(image, image) / (1 + w) for every document: the frozen tower's ranking exactly (the identity
head's promise, models/oclear.py). Adam's first step moves G off zero whatever the size of that
first gradient (the normalisation's slope at 0 is large; the trainer's gradient clip bounds it).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from oclear_jax.models import vit
from oclear_jax.models.fusion import EMBED_AXES, TitleFeatures, l2_normalize


def join(main: jax.Array, title_part: jax.Array, weight: float) -> jax.Array:
  """[unit main, sqrt(w) * unit title part] / sqrt(1 + w): unit norm once the title part is non-zero."""
  joined = jnp.concatenate([main, math.sqrt(weight) * title_part], axis=-1) / math.sqrt(1.0 + weight)
  return nn.with_logical_constraint(joined, EMBED_AXES)


def split(embeddings: jax.Array, embed_dim: int) -> tuple[jax.Array, jax.Array]:
  """(unit image part f32[B, embed_dim], unit title part f32[B, k]) of joined embeddings."""
  return l2_normalize(embeddings[:, :embed_dim]), l2_normalize(embeddings[:, embed_dim:])


class TitleMatch(nn.Module):
  """G (image -> expected title) and F (title -> its place), both k wide and L2-normalised."""
  dim: int
  weight: float

  def setup(self):
    if self.dim <= 0 or not self.weight > 0:
      raise ValueError(f"title matching needs model.title_match_dim > 0 and model.title_match_weight > 0; got "
                       f"{self.dim}, {self.weight}")
    # Starts at zero: step 0 ranks as the image parts alone do (module docstring).
    self.from_image = vit.partitioned_dense(self.dim, ("embed", "proj"), name="from_image",
                                            kernel_init=nn.initializers.zeros_init())
    self.from_title = vit.partitioned_dense(self.dim, ("embed", "proj"), name="from_title")

  def expected_title(self, image_pooled: jax.Array) -> jax.Array:
    return l2_normalize(self.from_image(l2_normalize(image_pooled)))

  def query(self, main: jax.Array, image_pooled: jax.Array) -> jax.Array:
    return join(main, self.expected_title(image_pooled), self.weight)

  def document(self, main: jax.Array, image_pooled: jax.Array, title: TitleFeatures) -> jax.Array:
    titled = l2_normalize(self.from_title(l2_normalize(title.pooled)))
    part = jnp.where(title.present[:, None], titled, self.expected_title(image_pooled))
    return join(main, part, self.weight)
