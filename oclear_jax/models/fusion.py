"""Document fusion: a catalogue image embedding plus (maybe) what its title adds.

Modes (`config.model.fusion`):
  image_only  the title is ignored (and the model builds no text tower at all);
  sum         doc = img + proj(text);
  gated       doc = img + g * proj(text), g = sigmoid(Dense([img, text])) with one gate *per
              embedding dimension*: a title can be decisive about colour or brand dimensions and
              useless for shape, which a scalar gate cannot express. Gate biases start at 0 (g=0.5).

In both text modes the title term is switched off (with `jnp.where`, so bit-exactly) when the
title is empty, i.e. holds nothing but [PAD]/[CLS]/[SEP]. An untitled product therefore gets
exactly its image-only embedding, and the same holds for queries, whose titles are empty. Training
with `title_dropout` removes a whole title per example at that rate, so the image path alone
stays a good document embedding for products whose title is missing or useless at serving time.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from oclear_jax.models import text as text_lib
from oclear_jax.models import vit

FUSIONS = ("image_only", "sum", "gated")
# [CLS]=2 and [SEP]=3 in the vocabularies input_pipeline.tokenizer trains; a loaded BERT
# vocabulary ([CLS]=101, [SEP]=102) sets config.model.title_special_ids instead.
DEFAULT_SPECIAL_IDS = (2, 3)
EMBED_AXES = ("batch", "proj")


def title_present(tokens: jax.Array, special_ids: Sequence[int] = DEFAULT_SPECIAL_IDS) -> jax.Array:
  """bool[B]: does the title hold any token other than [PAD] and the special ids?"""
  content = tokens != text_lib.PAD_ID
  for special in special_ids:
    content &= tokens != special
  return content.any(axis=-1)


class DocumentFusion(nn.Module):
  """(img_emb f32[B, E], text_pooled f32[B, W] | None, has_title bool[B] | None) -> f32[B, E].

  Works before L2 normalization; the caller normalizes. `title_dropout` uses the 'dropout' rng
  only when `train` and the rate is positive, so evaluation needs no rng.
  """
  mode: str = "gated"
  title_dropout: float = 0.0

  @nn.compact
  def __call__(self, img_emb: jax.Array, text_pooled: jax.Array | None, has_title: jax.Array | None, *,
               train: bool = False) -> jax.Array:
    if self.mode not in FUSIONS:
      raise ValueError(f"model.fusion={self.mode!r} is not supported; use one of {FUSIONS}")
    if self.mode == "image_only":
      return img_emb
    if text_pooled is None or has_title is None:
      raise ValueError(f"fusion={self.mode!r} needs the pooled title and its presence flags")
    embed_dim = img_emb.shape[-1]
    if train and self.title_dropout > 0.0:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.title_dropout, has_title.shape)
      has_title = has_title & keep
    text_emb = vit.partitioned_dense(embed_dim, ("embed", "proj"), name="text_proj")(text_pooled)
    if self.mode == "gated":
      gate_in = jnp.concatenate([img_emb, text_pooled], axis=-1)
      gate = nn.sigmoid(vit.partitioned_dense(embed_dim, ("embed", "proj"), name="gate")(gate_in))
      text_emb = gate * text_emb
    fused = jnp.where(has_title[:, None], img_emb + text_emb, img_emb)
    return nn.with_logical_constraint(fused, EMBED_AXES)
