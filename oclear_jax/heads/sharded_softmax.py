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
all-gather is a reduce-scatter, of psum a broadcast); there is no custom_vjp.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from oclear_jax.heads.margins import MarginFn

# Padding logit: exp(_NEG - max) underflows to exactly 0, and unlike -inf it
# never produces inf - inf = nan in the online max updates.
_NEG = -1e30
_NORM_EPS = 1e-12


def num_class_shards(mesh: Mesh, class_axes: Sequence[str]) -> int:
  """Number of shards of the class dimension: product of the axis sizes."""
  return math.prod(mesh.shape[a] for a in class_axes)


def pad_num_classes(num_classes: int,
                    num_class_shards: int,
                    chunk_size: int | None = None) -> int:
  """Smallest C_pad >= num_classes that every class shard (and chunk) divides.

  Args:
    num_classes: real number of classes.
    num_class_shards: see :func:`num_class_shards`.
    chunk_size: if set, also make each local shard a multiple of it, as
      required by ``margin_softmax_loss(..., chunk_size=...)``.
  """
  multiple = num_class_shards * (chunk_size or 1)
  return -(-num_classes // multiple) * multiple


def _l2_normalize(x: jax.Array) -> jax.Array:
  # max(|x|^2, eps) keeps all-zero (padding) rows finite in value and grad.
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS))


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _pmax(x, axes):
  return jax.lax.pmax(x, axes) if axes else x


def _linear_axis_index(axes: Sequence[str], mesh: Mesh) -> jax.Array:
  """Shard index of a dim sharded as P(axes): first axis is the major one."""
  idx = jnp.int32(0)
  for a in axes:
    idx = idx * mesh.shape[a] + jax.lax.axis_index(a)
  return idx


def _chunk_stats(emb_n, labels, centers, offset, *, num_classes,
                 margin_fn) -> dict[str, jax.Array]:
  """Row statistics of one block of classes starting at global ``offset``.

  Returns a dict of [rows] vectors: ``m`` (max logit, no grad), ``s``
  (sum exp(logit - m)), ``t`` (target logit, 0 if not in block), ``cmax``
  (max valid cosine, for accuracy) and ``tcos`` (target cosine).
  """
  cos = emb_n @ _l2_normalize(centers).T  # [R, K]
  gidx = offset + jnp.arange(centers.shape[0], dtype=jnp.int32)
  valid = (gidx < num_classes)[None, :]
  tmask = labels[:, None] == gidx[None, :]
  logits = jnp.where(valid, margin_fn(cos, tmask), _NEG)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=1))
  s = jnp.sum(jnp.exp(logits - m[:, None]), axis=1)
  t = jnp.sum(jnp.where(tmask, logits, 0.0), axis=1)
  cos_ng = jax.lax.stop_gradient(cos)
  cmax = jnp.max(jnp.where(valid, cos_ng, _NEG), axis=1)
  tcos = jnp.sum(jnp.where(tmask, cos_ng, 0.0), axis=1)
  return dict(m=m, s=s, t=t, cmax=cmax, tcos=tcos)


def _combine(a: dict[str, jax.Array],
             b: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Online log-sum-exp merge of two blocks' row statistics."""
  m = jnp.maximum(a["m"], b["m"])
  s = a["s"] * jnp.exp(a["m"] - m) + b["s"] * jnp.exp(b["m"] - m)
  return dict(m=m, s=s, t=a["t"] + b["t"],
              cmax=jnp.maximum(a["cmax"], b["cmax"]),
              tcos=a["tcos"] + b["tcos"])


def _local_stats(emb_n, labels, centers, offset, *, num_classes, margin_fn,
                 chunk_size):
  """Row statistics over this device's class shard, optionally chunked."""
  c_local = centers.shape[0]
  if chunk_size is None or chunk_size >= c_local:
    return _chunk_stats(emb_n, labels, centers, offset,
                        num_classes=num_classes, margin_fn=margin_fn)
  # Remat: the backward pass recomputes each chunk's [rows, chunk] logits
  # instead of keeping all of them, so it too stays O(rows x chunk).
  stats = jax.checkpoint(
      lambda e, c, o: _chunk_stats(e, labels, c, o, num_classes=num_classes,
                                   margin_fn=margin_fn))
  n_chunks = c_local // chunk_size
  chunks = centers.reshape(n_chunks, chunk_size, centers.shape[1])
  # The first chunk seeds the carry so that its types (including which mesh
  # axes it varies over) match the loop body's output exactly.
  init = stats(emb_n, chunks[0], offset)

  def body(carry, xs):
    i, chunk = xs
    return _combine(carry, stats(emb_n, chunk, offset + i * chunk_size)), None

  steps = jnp.arange(1, n_chunks, dtype=jnp.int32)
  out, _ = jax.lax.scan(body, init, (steps, chunks[1:]))
  return out


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
      classes with an online log-sum-exp (exact), rematerialised in the
      backward pass, so temporaries are O(rows x chunk_size). The local shard
      size C_pad / num_class_shards must be a multiple of it (pad with
      ``pad_num_classes(..., chunk_size=...)``).

  Returns:
    (loss, aux): replicated f32 scalar, and ``aux["accuracy"]``, the fraction
    of rows whose highest-cosine (margin-free, i.e. inference-time) class is
    the label.
  """
  batch_axes, class_axes = tuple(batch_axes), tuple(class_axes)
  c_pad = centers.shape[0]
  n_shards = num_class_shards(mesh, class_axes)
  if c_pad < num_classes or c_pad % n_shards:
    raise ValueError(
        f"centers has {c_pad} rows; need >= num_classes={num_classes} and a "
        f"multiple of the {n_shards} class shards: use pad_num_classes().")
  c_local = c_pad // n_shards
  if chunk_size is not None and c_local % chunk_size:
    raise ValueError(
        f"chunk_size={chunk_size} does not divide the local class shard size "
        f"{c_local} (= {c_pad} / {n_shards} shards); pad the centres with "
        f"pad_num_classes(num_classes, {n_shards}, chunk_size={chunk_size}).")
  if weights is None:
    weights = jnp.ones(labels.shape, jnp.float32)
  shared = tuple(a for a in batch_axes if a in class_axes)
  num_rows = embeddings.shape[0]

  def local(emb, lab, w, cen):
    rows = emb.shape[0]
    if shared:  # Every device of a class group now scores the same rows.
      emb, lab = (jax.lax.all_gather(x, shared, axis=0, tiled=True)
                  for x in (emb, lab))
    offset = _linear_axis_index(class_axes, mesh) * c_local
    st = _local_stats(_l2_normalize(emb), lab, cen, offset,
                      num_classes=num_classes, margin_fn=margin_fn,
                      chunk_size=chunk_size)
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
      start = _linear_axis_index(shared, mesh) * rows
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
                P(class_axes or None, None)),
      out_specs=(P(), {"accuracy": P()}))
  return fn(embeddings, labels.astype(jnp.int32),
            weights.astype(jnp.float32), centers)
