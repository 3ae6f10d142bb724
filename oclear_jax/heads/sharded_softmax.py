"""Exact margin softmax over a class dimension sharded across devices.

With up to 1e8 classes, neither the class centres nor the logits fit on one
device, so the softmax is computed without ever materialising (or gathering)
a full logits row:

1. Rows are made identical across a *class group* (devices that jointly hold
   all classes): embeddings / labels / weights are all-gathered over the axes
   that shard both the batch and the classes. Gathering [B, d] embeddings is
   cheap; gathering [B, C] logits would not be.
2. Each device scores its rows against its own class shard (optionally in
   chunks with an online log-sum-exp, so temporaries are O(rows x chunk)).
3. Row statistics are combined across the class group with ``pmax`` (max,
   stop-gradient: only a stabiliser) and ``psum`` (exp-sums, target logits).
4. Per-row losses are weighted, summed and ``psum``-ed over the batch-only
   axes, then divided by the global weight sum: a replicated scalar.

Gradients are left to autodiff through the collectives (the transpose of the
all-gather is a reduce-scatter, of psum a broadcast). Only the chunk loop has
a custom VJP, local to one device (``chunk_stats``): the forward
keeps nothing per chunk, the backward rescans the chunks once. Measured on 8
CPU devices it is faster than the unchunked head (benchmarks/head_speed.py).

Partial FC (``partial_fc_rate``): each shard scores only a sample of its
classes: every positive class of the rows it sees plus uniformly drawn
negatives, a static number per shard. The sampled centres are gathered by
index, so their gradients scatter back into exactly those rows. At rate 1.0
the sample is the whole shard (in another order) and the loss is the full one.
``class_ids`` takes rows sampled outside (``partial_fc.sample_class_rows``),
so a step can gather, update and scatter only those rows and their moments.

Precision (``compute_dtype``): with bfloat16 the matmul takes bf16 operands,
accumulates in f32 and stores the [rows, classes] cosines in bf16 (half the
temporaries); margins, max, exp-sums and the loss are computed in f32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from oclear_jax.heads import chunk_stats
from oclear_jax.heads import class_shards
from oclear_jax.heads.margins import MarginFn
from oclear_jax.heads.class_shards import num_chunks
from oclear_jax.heads.partial_fc import num_sampled_classes
from oclear_jax.heads.partial_fc import sample_classes


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _pmax(x, axes):
  return jax.lax.pmax(x, axes) if axes else x


def margin_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    num_classes: int,
    margin_fn: MarginFn,
    mesh: Mesh,
    batch_axes: Sequence[str],
    class_axes: Sequence[str],
    weights: jax.Array | None = None,
    chunk_size: int | None = None,
    partial_fc_rate: float | None = None,
    sample_key: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
    class_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
  """Weighted-mean margin softmax cross-entropy with sharded class centres.

  Args:
    embeddings: f32[B, d], sharded P(batch_axes, None); normalised inside.
    labels: int32[B] in [0, num_classes), sharded like the batch.
    centers: f32[C_pad, d], sharded P(class_axes, None); normalised inside.
      Rows >= num_classes are padding and never enter the softmax.
    num_classes: number of real classes.
    margin_fn: ``(cos, target_mask) -> logits``, e.g. from ``make_margin``.
    mesh: the device mesh.
    batch_axes: mesh axes sharding the batch dim (may be empty).
    class_axes: mesh axes sharding the class dim (may be empty: replicated).
    weights: optional f32[B] per-example weights; default uniform.
    chunk_size: if set, score each local class shard in chunks of this many
      classes at most, in equal chunks, with an online log-sum-exp (exact),
      recomputed once in the backward pass (custom VJP), so temporaries are
      O(rows x chunk_size). Pad the centres with
      ``pad_num_classes(..., chunk_size=...)`` so the chunks come out equal.
    partial_fc_rate: if set, Partial FC: each shard scores all positive
      classes of its rows plus sampled negatives, ``num_sampled_classes``
      in all (see :func:`sample_classes`). ``None`` scores every class.
    sample_key: PRNG key for Partial FC (required with it); each class shard
      folds in its index, so shards draw different negatives.
    compute_dtype: dtype of the matmul operands and of the stored cosines
      (``jnp.bfloat16`` halves the logits' memory); accumulation is f32.
    class_ids: int32[rows of centers], sharded like them: ``centers`` holds
      only these (already sampled) classes, e.g. the rows gathered by
      ``partial_fc.sample_class_rows`` for a row-sparse Partial FC step.

  Returns:
    (loss, aux): replicated f32 scalar, and ``aux["accuracy"]``, the fraction
    of rows whose highest-cosine (margin-free, i.e. inference-time) class is
    the label (among the sampled classes under Partial FC).
  """
  batch_axes, class_axes = tuple(batch_axes), tuple(class_axes)
  c_pad = centers.shape[0]
  n_shards = class_shards.num_class_shards(mesh, class_axes)
  if (class_ids is None and c_pad < num_classes) or c_pad % n_shards:
    raise ValueError(
        f"centers has {c_pad} rows; need >= num_classes={num_classes} and a "
        f"multiple of the {n_shards} class shards: use pad_num_classes().")
  c_local = c_pad // n_shards
  if c_local % num_chunks(c_local, chunk_size):
    raise ValueError(
        f"chunk_size={chunk_size} does not cut the local class shard of "
        f"{c_local} (= {c_pad} / {n_shards} shards) into equal chunks; pad the "
        f"centres with pad_num_classes(num_classes, {n_shards}, "
        f"chunk_size={chunk_size}).")
  if weights is None:
    weights = jnp.ones(labels.shape, jnp.float32)
  shared = tuple(a for a in batch_axes if a in class_axes)
  num_rows = embeddings.shape[0]
  num_sampled = None
  if partial_fc_rate is not None:
    if sample_key is None:
      raise ValueError("partial_fc_rate needs a sample_key")
    group_rows = num_rows // math.prod(mesh.shape[a] for a in batch_axes)
    group_rows *= math.prod(mesh.shape[a] for a in shared)
    num_sampled = num_sampled_classes(c_local, group_rows, partial_fc_rate,
                                      chunk_size)
  else:
    sample_key = jax.random.key(0)  # unused; keeps one shard_map signature
  given_ids = class_ids is not None
  if given_ids and partial_fc_rate is not None:
    raise ValueError("class_ids (pre-sampled rows) excludes partial_fc_rate")
  if not given_ids:  # unused placeholder; keeps one shard_map signature
    class_ids = jnp.zeros((n_shards,), jnp.int32)

  def local(emb, lab, w, cen, key, ids):
    rows = emb.shape[0]
    if shared:  # Every device of a class group now scores the same rows.
      emb, lab = (jax.lax.all_gather(x, shared, axis=0, tiled=True)
                  for x in (emb, lab))
    shard = class_shards.linear_axis_index(class_axes, mesh)
    offset = shard * c_local
    gidx = ids if given_ids else offset  # contiguous: ids made per chunk
    if num_sampled is not None:
      idx = sample_classes(jax.random.fold_in(key, shard), lab, offset,
                           c_local, num_classes, num_sampled)
      cen, gidx = jnp.take(cen, idx, axis=0), offset + idx
    st = chunk_stats.local_stats(chunk_stats.l2_normalize(emb), lab, cen, gidx,
                      num_classes=num_classes, margin_fn=margin_fn,
                      chunk_size=chunk_size, compute_dtype=compute_dtype)
    gmax = jax.lax.stop_gradient(_pmax(st["m"], class_axes))
    sumexp = _psum(st["s"] * jnp.exp(st["m"] - gmax), class_axes)
    row_loss = gmax + jnp.log(sumexp) - _psum(st["t"], class_axes)
    # Ties between the target and another class count as correct.
    correct = (_psum(st["tcos"], class_axes) >=
               _pmax(st["cmax"], class_axes)).astype(jnp.float32)
    if shared:
      # Each device reduces only the rows it owned before the gather, so the
      # batch-axes psum counts every row once (and its weight needs no
      # gather); autodiff routes the other rows' cotangents back via psum.
      start = class_shards.linear_axis_index(shared, mesh) * rows
      row_loss, correct = (jax.lax.dynamic_slice_in_dim(x, start, rows)
                           for x in (row_loss, correct))
    loss = _psum(jnp.sum(w * row_loss), batch_axes)
    wsum = _psum(jnp.sum(w), batch_axes)
    ncorrect = _psum(jnp.sum(correct), batch_axes)
    return loss / wsum, {"accuracy": ncorrect / num_rows}

  row_spec = P(batch_axes or None)
  fn = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(batch_axes or None, None), row_spec, row_spec,
                P(class_axes or None, None), P(), P(class_axes or None)),
      out_specs=(P(), {"accuracy": P()}))
  return fn(embeddings, labels.astype(jnp.int32),
            weights.astype(jnp.float32), centers, sample_key,
            class_ids.astype(jnp.int32))
