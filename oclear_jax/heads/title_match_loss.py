"""The title-matching loss: each titled row's photo classified among the batch's titles.

`models/title_match.py` gives a query a part G(photo) that should point at its product's title and
a document a part F(title). Here the classes are the titles in the (global) batch: row i's expected
title G(photo_i) against every titled row's F(title_j), the head's margin on the diagonal. Rows with
the same title as row i (same product, or a title shared by several products) are neither its
positive nor its negatives: they are masked out, found by their title parts being equal (F is one
deterministic map, so equal titles give equal vectors). Untitled rows take no part on either side.

The batch is the global one: under jit the [B, k] parts are sharded by batch and XLA gathers the
(small) title side, as for the InfoNCE baseline; nothing here is per class, so it scales with the
batch, not with the number of categories.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from oclear_jax.heads import margins

SAME_TITLE_COS = 1.0 - 1e-5  # title parts this close are one title (equal up to float rounding)
MASKED_COS = -2.0  # below any cosine: exp(scale * (-2 - 1)) vanishes against the row's own title


def title_match_loss(expected: jax.Array, titles: jax.Array, present: jax.Array,
                     margin_fn: margins.MarginFn) -> tuple[jax.Array, jax.Array]:
  """(mean loss over titled rows, their in-batch top-1 accuracy).

  expected: unit f32[B, k], G(photo) of each row; titles: unit f32[B, k], F(title) of each row;
  present: bool[B], the row has a title. With no titled row the loss is 0.
  """
  cos = jnp.matmul(expected, titles.T, precision=jax.lax.Precision.HIGHEST)
  same = jax.lax.stop_gradient(jnp.matmul(titles, titles.T, precision=jax.lax.Precision.HIGHEST)) >= SAME_TITLE_COS
  own = jnp.eye(cos.shape[0], dtype=bool)
  competing = present[None, :] & (own | ~same)
  logits = margin_fn(jnp.where(competing, cos, MASKED_COS), own)
  log_p = jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
  weight = present.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  hit = jnp.argmax(jnp.where(competing, cos, MASKED_COS), axis=-1) == jnp.arange(cos.shape[0])
  return -(log_p * weight).sum() / count, (hit * weight).sum() / count
