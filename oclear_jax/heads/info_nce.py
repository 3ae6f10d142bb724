"""Symmetric in-batch InfoNCE (CLIP's objective): the contrastive baseline beside the margin softmax.

Row i's query view and document view are each other's positive; every other row of the batch is a
negative, whatever its label (so no class centres are needed). The temperature is learned as
`log(1 / temperature)` and the logit scale clipped at 100, as CLIP does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

MAX_LOGIT_SCALE = 100.0


def info_nce_loss(query_emb: jax.Array, doc_emb: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
  """(CE(q -> d) + CE(d -> q)) / 2, averaged over the batch.

  `query_emb`, `doc_emb`: f32[B, D], unit norm, row i of each side the positive of row i of the
  other; `logit_scale` = 1 / temperature.
  """
  logits = logit_scale * jnp.matmul(query_emb, doc_emb.T, precision=jax.lax.Precision.HIGHEST)
  targets = jnp.arange(logits.shape[0])
  q2d = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  d2q = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  return 0.5 * (q2d.mean() + d2q.mean())


def logit_scale(logit_scale_log: jax.Array) -> jax.Array:
  """The learned 1 / temperature, clipped at `MAX_LOGIT_SCALE` (no gradient beyond the clip)."""
  return jnp.minimum(jnp.exp(logit_scale_log), MAX_LOGIT_SCALE)


def in_batch_accuracy(query_emb: jax.Array, doc_emb: jax.Array) -> jax.Array:
  """Share of queries whose nearest document in the batch is their own (the q -> d top-1)."""
  scores = jnp.matmul(query_emb, doc_emb.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.mean(jnp.argmax(scores, axis=1) == jnp.arange(scores.shape[0]))
