"""How the class dimension is cut: over mesh axes into shards, each shard into equal chunks.

The bottom of `heads/`: `chunk_stats` (one shard's chunk loop), `partial_fc` (one shard's sample)
and `sharded_softmax` (the collectives) all size their pieces with these, and nothing here
imports them back.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh


def num_chunks(c_local: int, chunk_size: int | None) -> int:
  return 1 if not chunk_size or chunk_size >= c_local else -(-c_local // chunk_size)


def num_class_shards(mesh: Mesh, class_axes: Sequence[str]) -> int:
  """Number of shards of the class dimension: product of the axis sizes."""
  return math.prod(mesh.shape[a] for a in class_axes)


def pad_num_classes(num_classes: int,
                    num_class_shards: int,
                    chunk_size: int | None = None) -> int:
  """Smallest C_pad >= num_classes that splits evenly into shards (and chunks).

  With ``chunk_size`` (the *largest* chunk), each shard of ``ceil(C / shards)``
  classes is cut into ``n = ceil(shard / chunk_size)`` equal chunks, so the
  padding is under ``n`` classes per shard rather than up to a whole chunk:
  10^6 classes on 8 shards in chunks of at most 8,192 pad to 1,000,064, not
  1,048,576.

  Args:
    num_classes: real number of classes.
    num_class_shards: see :func:`num_class_shards`.
    chunk_size: if set, the largest chunk ``margin_softmax_loss(...,
      chunk_size=...)`` will use.
  """
  local = -(-num_classes // num_class_shards)
  n_chunks = num_chunks(local, chunk_size)
  return -(-local // n_chunks) * n_chunks * num_class_shards


def linear_axis_index(axes: Sequence[str], mesh: Mesh) -> jax.Array:
  """Shard index of a dim sharded as P(axes) (inside shard_map): first axis is the major one."""
  idx = jnp.int32(0)
  for a in axes:
    idx = idx * mesh.shape[a] + jax.lax.axis_index(a)
  return idx
