"""Partial FC sampling: which classes each shard scores (every positive plus uniform negatives).

`sample_classes` picks one shard's sample (static count, positives guaranteed); `sample_class_rows`
runs it on every shard of a mesh so that a train step can gather just those rows of the centres and
of their optimizer moments, update them, and scatter them back (see center_optimizer.py).

Cost (measured by benchmarks/head_speed.py): the top_k over one shard's scores is a few per cent of a
Partial FC step; the dense alternative's gradient scatter into a zero [C/N, d] buffer plus a dense
Adam over every row are what dominate at rate 0.1, which is what the row-sparse step removes.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from oclear_jax.heads import class_shards
from oclear_jax.heads.class_shards import num_chunks


def num_sampled_classes(c_local: int, rows: int, rate: float,
                        chunk_size: int | None = None) -> int:
  """Classes one shard scores under Partial FC: a static count.

  ``ceil(rate * c_local)``, but never fewer than the ``rows`` the shard sees
  (so every positive class fits), rounded up to whole chunks, at most the
  whole shard.
  """
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"partial_fc_rate={rate} must lie in (0, 1]")
  n = min(max(math.ceil(rate * c_local), rows), c_local)
  n_chunks = num_chunks(n, chunk_size)
  return min(-(-n // n_chunks) * n_chunks, c_local)


def sample_classes(key: jax.Array, labels: jax.Array, offset: jax.Array,
                   c_local: int, num_classes: int,
                   num_sampled: int) -> jax.Array:
  """Sorted local indices of ``num_sampled`` classes of one shard.

  Every positive class (a label of ``labels`` inside this shard) is taken;
  the rest are uniform draws among the shard's real (non-padding) classes.
  Positives score in [2, 3), negatives in [0, 1), padding -1, and ``top_k``
  keeps the best: static shapes, no rejection loop. If the shard has fewer
  real classes than ``num_sampled``, padding fills the rest and stays masked
  out of the softmax by its global index.
  """
  local = labels - offset
  inside = (local >= 0) & (local < c_local)
  positive = jnp.zeros((c_local,), jnp.bool_).at[
      jnp.where(inside, local, c_local)].set(True, mode="drop")
  real = offset + jnp.arange(c_local, dtype=jnp.int32) < num_classes
  score = jax.random.uniform(key, (c_local,)) + 2.0 * positive
  score = jnp.where(real, score, -1.0)
  _, idx = jax.lax.top_k(score, num_sampled)
  return jnp.sort(idx).astype(jnp.int32)


def sample_class_rows(key: jax.Array, labels: jax.Array, *, num_classes: int, c_pad: int, rate: float,
                      mesh: Mesh, batch_axes: Sequence[str], class_axes: Sequence[str],
                      chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Each class shard's Partial FC sample, as ``margin_softmax_loss`` would draw it.

  Returns (local_ids, class_ids): int32[shards * S] each, sharded P(class_axes): the sorted local row
  indices into each shard (for gathering centres and moments) and the global class ids of those rows
  (``margin_softmax_loss(..., class_ids=...)``). Same key, same sample as the in-loss path.
  """
  batch_axes, class_axes = tuple(batch_axes), tuple(class_axes)
  n_shards = class_shards.num_class_shards(mesh, class_axes)
  c_local = c_pad // n_shards
  shared = tuple(a for a in batch_axes if a in class_axes)
  group_rows = labels.shape[0] // math.prod(mesh.shape[a] for a in batch_axes)
  group_rows *= math.prod(mesh.shape[a] for a in shared)
  num_sampled = num_sampled_classes(c_local, group_rows, rate, chunk_size)

  def local(lab, k):
    if shared:
      lab = jax.lax.all_gather(lab, shared, axis=0, tiled=True)
    shard = class_shards.linear_axis_index(class_axes, mesh)
    offset = shard * c_local
    idx = sample_classes(jax.random.fold_in(k, shard), lab, offset, c_local, num_classes, num_sampled)
    # Rows outside the class group's batch axes saw other labels: every device of a class shard
    # must hold the same sample (the centres are replicated there), so it is drawn from the union.
    return idx, offset + idx

  spec = P(class_axes or None)
  other = tuple(a for a in batch_axes if a not in class_axes)
  if other:
    raise NotImplementedError(f"sample_class_rows needs batch_axes {batch_axes} inside class_axes "
                              f"{class_axes} (one sample per class shard)")
  return jax.shard_map(local, mesh=mesh, in_specs=(P(batch_axes or None), P()), out_specs=(spec, spec))(
      labels.astype(jnp.int32), key)
