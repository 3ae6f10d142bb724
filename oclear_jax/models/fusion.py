"""Document fusion: a catalogue image embedding plus (maybe) what its title adds.

Modes (`config.model.fusion`), the ablation axis of the method:
  image_only         the title is ignored (and the model builds no text tower at all);
  sum                doc = img + proj(text_pooled);
  gated              doc = img + g * proj(text_pooled), g = sigmoid(Dense([img, text_pooled])) with
                     one gate *per embedding dimension*: a title can be decisive about colour or
                     brand dimensions and useless for shape, which a scalar gate cannot express.
                     Gate biases start at 0 (g = 0.5);
  bounded            doc = img/|img| + a * t/|t|, t = proj(text_pooled), a one learned scalar that
                     starts at 0: the title term's norm is |a| times the image term's, whatever the
                     projection learns. Trained by classification over same-product categories, a
                     per-dimension gate (above) lets the title become a class lookup: on training
                     products the title alone names the category, so its term grows into a lookup
                     of the training categories, and on unseen products the document drifts from
                     where their query photos land (benchmarks/real_retrieval.py, rows oclear_gated
                     and oclear). One scalar weight is all the title gets here, learned across all
                     categories;
  concat_mlp         doc = MLP([img, text_pooled]): the usual late-fusion baseline, no residual
                     image path (so nothing keeps it image-dominant but the loss);
  concept_attention  the method: K learned concept slots read the title tokens, attend over the
                     image's spatial tokens, and enter through an input-dependent gate
                     (`concept_memory.ConceptMemoryFusion`).

In every text mode the title term is switched off (with `jnp.where`, so bit-exactly) when the
title is empty, i.e. holds nothing but [PAD]/[CLS]/[SEP]. An untitled product therefore gets
exactly its image-only embedding, and the same holds for queries, whose titles are empty. Training
with `title_dropout` removes a whole title per example at that rate, so the image path alone
stays a good document embedding for products whose title is missing or useless at serving time.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from oclear_jax.models import concept_memory
from oclear_jax.models import text as text_lib
from oclear_jax.models import vit

FUSIONS = ("image_only", "sum", "gated", "bounded", "concat_mlp", "concept_attention")
# [CLS]=2 and [SEP]=3 in the vocabularies input_pipeline.tokenizer trains. A loaded BERT
# vocabulary has [CLS]=101, [SEP]=102: the tokenizer reports them (TitleTokenizer.special_ids),
# records.json stores them and the trainer passes them to build_model(title_special_ids=...).
DEFAULT_SPECIAL_IDS = (2, 3)
EMBED_AXES = ("batch", "proj")
# Fusions whose title term is one projection that can start at zero (DocumentFusion.zero_init).
ZERO_INIT_FUSIONS = ("image_only", "sum", "gated", "bounded")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class TitleFeatures(NamedTuple):
  """What the text tower says about a batch of titles (a pytree, so it crosses `apply` and `jit`)."""
  tokens: jax.Array  # f32[B, L, W]
  pooled: jax.Array  # f32[B, W]
  mask: jax.Array  # bool[B, L], True on non-pad tokens
  present: jax.Array  # bool[B], False for empty titles ([PAD]/[CLS]/[SEP] only)


def title_present(tokens: jax.Array, special_ids: Sequence[int] = DEFAULT_SPECIAL_IDS) -> jax.Array:
  """bool[B]: does the title hold any token other than [PAD] and the special ids?"""
  content = tokens != text_lib.PAD_ID
  for special in special_ids:
    content &= tokens != special
  return content.any(axis=-1)


class DocumentFusion(nn.Module):
  """(img_emb f32[B, E], title TitleFeatures | None, image_tokens f32[B, N, W] | None) -> f32[B, E].

  Works before L2 normalization; the caller normalizes. `title_dropout` uses the 'dropout' rng
  only when `train` and the rate is positive, so evaluation needs no rng. `image_tokens` is only
  read by 'concept_attention'.
  """
  mode: str = "gated"
  title_dropout: float = 0.0
  concept_slots: int = 16
  concept_heads: int = 4
  # The title term starts at zero, so an untrained document is exactly its image embedding (used
  # with pretrained towers: step 0 reproduces the frozen tower). sum, gated (zero projection) and
  # bounded (its scale starts at zero in every case).
  zero_init: bool = False

  @nn.compact
  def __call__(self, img_emb: jax.Array, title: TitleFeatures | None, image_tokens: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    if self.mode not in FUSIONS:
      raise ValueError(f"model.fusion={self.mode!r} is not supported; use one of {FUSIONS}")
    if self.mode == "image_only":
      return img_emb
    if title is None:
      raise ValueError(f"fusion={self.mode!r} needs the title features (TitleFeatures) of the text tower")
    embed_dim = img_emb.shape[-1]
    present = title.present
    if train and self.title_dropout > 0.0:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.title_dropout, present.shape)
      present = present & keep
    if self.mode == "concept_attention":
      return concept_memory.ConceptMemoryFusion(self.concept_slots, self.concept_heads, name="concept_memory")(
          img_emb, image_tokens, title.tokens, title.mask, present)
    if self.mode == "concat_mlp":
      hidden = nn.gelu(vit.partitioned_dense(2 * embed_dim, ("embed", "mlp"), name="fc1")(
          jnp.concatenate([img_emb, title.pooled], axis=-1)))
      hidden = nn.with_logical_constraint(hidden, ("batch", "mlp"))
      fused = vit.partitioned_dense(embed_dim, ("mlp", "proj"), name="fc2")(hidden)
    elif self.mode == "bounded":
      text_emb = vit.partitioned_dense(embed_dim, ("embed", "proj"), name="text_proj")(title.pooled)
      weight = self.param("title_weight", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), ())
      self.sow("intermediates", "title_weight", weight)
      fused = l2_normalize(img_emb) + weight * l2_normalize(text_emb)
    else:
      text_init = nn.initializers.zeros_init() if self.zero_init else nn.initializers.xavier_uniform()
      text_emb = vit.partitioned_dense(embed_dim, ("embed", "proj"), name="text_proj", kernel_init=text_init)(
          title.pooled)
      if self.mode == "gated":
        gate_in = jnp.concatenate([img_emb, title.pooled], axis=-1)
        gate = nn.sigmoid(vit.partitioned_dense(embed_dim, ("embed", "proj"), name="gate")(gate_in))
        self.sow("intermediates", "title_gate", gate * present[:, None].astype(gate.dtype))
        text_emb = gate * text_emb
      fused = img_emb + text_emb
    fused = jnp.where(present[:, None], fused, img_emb)
    return nn.with_logical_constraint(fused, EMBED_AXES)
