"""Exact maximum-inner-product top-k search in JAX, chunked over the gallery.

This is the ground truth for evaluation and for measuring ScaNN's recall. The
gallery is split into fixed-size chunks and scanned with `jax.lax.scan`: each
step scores one chunk (``q @ chunk.T``), keeps its top k with `jax.lax.top_k`,
and merges them into a running top k with a second `top_k`. Peak memory is
therefore ``query_batch x gallery_chunk`` scores, not ``Q x N``, so catalogues
far larger than one matmul fit, and every shape is static, so one compilation
serves every batch.

Embeddings are expected L2-normalised, which makes the dot product the cosine
similarity.

Tie-breaking is deterministic: among equal scores the lower gallery index
ranks first. `jax.lax.top_k` is documented to put the lower position first,
and the merge concatenates the running top k (earlier chunks, lower indices)
before the new chunk's, so the property survives merging.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _dense_ids(query_ids: np.ndarray, gallery_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps ids of any dtype (ints, strings) onto shared int32 codes for the device."""
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  _, codes = np.unique(np.concatenate([query_ids, gallery_ids]), return_inverse=True)
  codes = codes.reshape(-1).astype(np.int32)
  return codes[:len(query_ids)], codes[len(query_ids):]


@functools.partial(jax.jit, static_argnames=("k",))
def _search_batch(queries, query_ids, chunks, chunk_ids, chunk_valid, *, k):
  """Top k over all chunks for one query batch.

  Args:
    queries: f32[B, d].
    query_ids: int32[B]; -1 means "no self-exclusion" for that query.
    chunks: f32[C, S, d], the padded gallery.
    chunk_ids: int32[C, S] gallery ids (-2 where unused, never equal to a
      query id).
    chunk_valid: bool[C, S]; False on padding.
    k: number of results.

  Returns:
    (scores f32[B, k], indices int32[B, k]); -inf / -1 in empty slots.
  """
  b, s = queries.shape[0], chunks.shape[1]
  k_chunk = min(k, s)

  def step(carry, xs):
    best_scores, best_idx = carry
    chunk, ids, valid, start = xs
    scores = jnp.dot(queries, chunk.T, precision=jax.lax.Precision.HIGHEST)
    keep = valid[None, :] & (ids[None, :] != query_ids[:, None])
    scores = jnp.where(keep, scores, -jnp.inf)
    top_scores, top_local = jax.lax.top_k(scores, k_chunk)
    # Running results first: they come from earlier chunks (lower indices),
    # so a stable top_k keeps "lower index wins ties" across the merge.
    merged_scores = jnp.concatenate([best_scores, top_scores], axis=1)
    merged_idx = jnp.concatenate([best_idx, top_local + start], axis=1)
    new_scores, pos = jax.lax.top_k(merged_scores, k)
    new_idx = jnp.take_along_axis(merged_idx, pos, axis=1)
    return (new_scores, new_idx), None

  init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32))
  starts = jnp.arange(chunks.shape[0], dtype=jnp.int32) * s
  (scores, idx), _ = jax.lax.scan(step, init, (chunks, chunk_ids, chunk_valid, starts))
  idx = jnp.where(jnp.isneginf(scores), -1, idx)
  return scores, idx


def exact_top_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    gallery_chunk: int = 65536,
    query_batch: int = 1024,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k gallery items by dot product for every query.

  Args:
    queries: f32[Q, d].
    gallery: f32[N, d].
    k: results per query. If k exceeds the number of candidates (N, or N - 1
      under self-exclusion) the tail is padded with index -1 and score -inf.
    gallery_chunk: gallery rows scored per scan step (memory knob).
    query_batch: queries per jitted call (memory knob). The last batch is
      padded to the same size so one compilation serves all batches.
    exclude: optional ``(query_ids [Q], gallery_ids [N])`` for leave-one-out
      evaluation: gallery items whose id equals the query's id are never
      returned. Ids may be of any dtype.

  Returns:
    ``(scores f32[Q, k], indices int32[Q, k])``, best first; ties go to the
    lower gallery index.
  """
  queries = np.asarray(queries, np.float32)
  gallery = np.asarray(gallery, np.float32)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"need [Q, d] and [N, d], got {queries.shape} and {gallery.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  num_q, n = queries.shape[0], gallery.shape[0]
  if num_q == 0 or n == 0:
    return (np.full((num_q, k), -np.inf, np.float32), np.full((num_q, k), -1, np.int32))

  if exclude is None:
    q_ids = np.full(num_q, -1, np.int32)
    g_ids = np.full(n, -2, np.int32)
  else:
    q_ids, g_ids = _dense_ids(*exclude)
    if len(q_ids) != num_q or len(g_ids) != n:
      raise ValueError("exclude ids must be [Q] and [N]")

  chunk = min(gallery_chunk, n)
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  d = gallery.shape[1]
  chunks = jnp.asarray(np.pad(gallery, ((0, pad), (0, 0))).reshape(num_chunks, chunk, d))
  chunk_ids = jnp.asarray(np.pad(g_ids, (0, pad), constant_values=-2).reshape(num_chunks, chunk))
  chunk_valid = jnp.asarray((np.arange(num_chunks * chunk) < n).reshape(num_chunks, chunk))

  batch = min(query_batch, num_q)
  all_scores, all_idx = [], []
  for s in range(0, num_q, batch):
    q = queries[s:s + batch]
    qi = q_ids[s:s + batch]
    valid = len(q)
    if valid < batch:
      q = np.pad(q, ((0, batch - valid), (0, 0)))
      qi = np.pad(qi, (0, batch - valid), constant_values=-1)
    scores, idx = _search_batch(q, qi, chunks, chunk_ids, chunk_valid, k=k)
    all_scores.append(np.asarray(scores)[:valid])
    all_idx.append(np.asarray(idx)[:valid])
  return np.concatenate(all_scores), np.concatenate(all_idx).astype(np.int32)
