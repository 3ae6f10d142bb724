"""Exact maximum-inner-product top-k search in JAX, chunked over the gallery.

This is the ground truth for evaluation and for measuring ScaNN's recall. The
gallery is split into fixed-size chunks and scanned with `jax.lax.scan`: each
step scores one chunk (``q @ chunk.T``), keeps its top k with `jax.lax.top_k`,
and merges them into a running top k with a second `top_k`. Peak memory is
therefore ``query_batch x gallery_chunk`` scores, not ``Q x N``, so catalogues
far larger than one matmul fit, and every shape is static, so one compilation
serves every batch.

Galleries larger than memory stream through `exact_top_k_blocks` one block at a
time (e.g. the memory-mapped shards of an embedding export): the running top k of
every query is carried from block to block as the scan's initial value, so device
memory holds one block, never the gallery.

Embeddings are expected L2-normalised, which makes the dot product the cosine
similarity.

Tie-breaking is deterministic: among equal scores the lower gallery index
ranks first. `jax.lax.top_k` is documented to put the lower position first,
and the merge concatenates the running top k (earlier chunks and blocks, lower
indices) before the new chunk's, so the property survives merging.

`fastest_exact_top_k` picks the fastest exact method of the backend: on CPU,
ScaNN's brute-force scorer run multi-threaded (measured on 2 cores: ~1.7x this
module's jitted search at 1M x 256, see benchmarks/retrieval_speed.py), with the
same tie rule imposed on its results (`ScannIndex._search_exact`); on GPU/TPU,
the jitted search here. Both equal a float64 numpy reference wherever f32 dot
products are exact (the tests use small-integer vectors, where ties abound); on
real-valued vectors the two may order two scores differing only by f32
rounding (summation order) differently.
"""
from collections.abc import Iterable, Iterator
import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm


def _dense_ids(query_ids: np.ndarray, gallery_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps ids of any dtype (ints, strings) onto shared int32 codes for the device."""
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  _, codes = np.unique(np.concatenate([query_ids, gallery_ids]), return_inverse=True)
  codes = codes.reshape(-1).astype(np.int32)
  return codes[:len(query_ids)], codes[len(query_ids):]


@functools.partial(jax.jit, static_argnames=("k",))
def _search_batch(queries, query_ids, chunks, chunk_ids, chunk_valid, best_scores, best_idx, offset, *, k):
  """Merges one gallery block into the running top k of one query batch.

  Args:
    queries: f32[B, d].
    query_ids: int32[B]; -1 means "no self-exclusion" for that query.
    chunks: f32[C, S, d], the padded gallery block.
    chunk_ids: int32[C, S] gallery ids (-2 where unused, never equal to a
      query id).
    chunk_valid: bool[C, S]; False on padding.
    best_scores: f32[B, k] running top scores (-inf when empty).
    best_idx: int32[B, k] their global gallery indices (-1 when empty).
    offset: int32 global index of the block's first row.
    k: number of results.

  Returns:
    (scores f32[B, k], indices int32[B, k]); -inf / -1 in empty slots.
  """
  s = chunks.shape[1]
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

  starts = offset + jnp.arange(chunks.shape[0], dtype=jnp.int32) * s
  (scores, idx), _ = jax.lax.scan(step, (best_scores, best_idx), (chunks, chunk_ids, chunk_valid, starts))
  idx = jnp.where(jnp.isneginf(scores), -1, idx)
  return scores, idx


def _check(queries: np.ndarray, d: int | None, k: int) -> np.ndarray:
  queries = np.asarray(queries, np.float32)
  if queries.ndim != 2 or (d is not None and queries.shape[1] != d):
    raise ValueError(f"need queries [Q, d] and gallery [N, d], got {queries.shape} and d={d}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  return queries


def _padded_block(block: np.ndarray, ids: np.ndarray, chunk: int):
  """(chunks f32[C, chunk, d], ids int32[C, chunk], valid bool[C, chunk]) on device."""
  n, d = block.shape
  num_chunks = -(-n // chunk)
  if num_chunks * chunk == n:
    padded = np.ascontiguousarray(block, np.float32)
  else:
    padded = np.zeros((num_chunks * chunk, d), np.float32)
    padded[:n] = block
  chunk_ids = np.full(num_chunks * chunk, -2, np.int32)
  chunk_ids[:n] = ids
  valid = np.arange(num_chunks * chunk) < n
  return (jnp.asarray(padded.reshape(num_chunks, chunk, d)), jnp.asarray(chunk_ids.reshape(num_chunks, chunk)),
          jnp.asarray(valid.reshape(num_chunks, chunk)))


def exact_top_k_blocks(
    queries: np.ndarray,
    blocks: Iterable[np.ndarray],
    k: int,
    *,
    gallery_chunk: int = 65536,
    query_batch: int = 1024,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    num_blocks: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k over a gallery given as consecutive row blocks f32[n_i, d].

  Indices are global (block offsets added), so the result equals `exact_top_k`
  on the concatenated gallery, ties included. Each block is read once; blocks of
  equal size share one compilation (make blocks a multiple of `gallery_chunk`,
  or give every block but the last the same size).

  Args:
    queries: f32[Q, d].
    blocks: gallery rows in order, e.g. memory-mapped embedding shards.
    k: results per query (-1 / -inf pad where the gallery is smaller).
    gallery_chunk: gallery rows scored per scan step (memory knob).
    query_batch: queries per jitted call (memory knob).
    exclude: optional ``(query_ids [Q], gallery_ids [N])`` over the whole
      gallery, for leave-one-out evaluation (see `exact_top_k`).
    num_blocks: for the progress bar only.
    progress: show a tqdm bar over blocks.

  Returns:
    ``(scores f32[Q, k], indices int32[Q, k])``, best first.
  """
  queries = _check(queries, None, k)
  num_q = queries.shape[0]
  best_scores = np.full((num_q, k), -np.inf, np.float32)
  best_idx = np.full((num_q, k), -1, np.int32)
  if exclude is not None:
    q_ids, g_ids = _dense_ids(*exclude)
    if len(q_ids) != num_q:
      raise ValueError("exclude ids must be [Q] and [N]")
  else:
    q_ids, g_ids = np.full(num_q, -1, np.int32), None
  offset = 0
  batch = max(1, min(query_batch, num_q))
  for block in tqdm.tqdm(blocks, total=num_blocks, desc="exact search", unit="block", disable=not progress):
    block = np.asarray(block)
    if block.ndim != 2 or block.shape[1] != queries.shape[1]:
      raise ValueError(f"need queries [Q, d] and gallery blocks [n, d], got {queries.shape} and {block.shape}")
    n = block.shape[0]
    if n == 0 or num_q == 0:
      continue
    ids = np.full(n, -2, np.int32) if g_ids is None else g_ids[offset:offset + n]
    if len(ids) != n:
      raise ValueError(f"exclude gallery ids cover {len(g_ids)} rows but the blocks have more")
    chunks, chunk_ids, chunk_valid = _padded_block(block, ids, min(gallery_chunk, n))
    for s in range(0, num_q, batch):
      valid = min(batch, num_q - s)
      q, qi = queries[s:s + batch], q_ids[s:s + batch]
      bs, bi = best_scores[s:s + batch], best_idx[s:s + batch]
      if valid < batch:  # the last batch is padded so one compilation serves all batches
        pad = batch - valid
        q, qi = np.pad(q, ((0, pad), (0, 0))), np.pad(qi, (0, pad), constant_values=-1)
        bs = np.pad(bs, ((0, pad), (0, 0)), constant_values=-np.inf)
        bi = np.pad(bi, ((0, pad), (0, 0)), constant_values=-1)
      scores, idx = _search_batch(q, qi, chunks, chunk_ids, chunk_valid, bs, bi, np.int32(offset), k=k)
      best_scores[s:s + valid] = np.asarray(scores)[:valid]
      best_idx[s:s + valid] = np.asarray(idx)[:valid]
    offset += n
  if g_ids is not None and offset != len(g_ids):
    raise ValueError(f"exclude gallery ids cover {len(g_ids)} rows but the blocks hold {offset}")
  return best_scores, best_idx


def _row_blocks(gallery: np.ndarray, rows: int) -> Iterator[np.ndarray]:
  for s in range(0, gallery.shape[0], rows):
    yield gallery[s:s + rows]


def exact_top_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    gallery_chunk: int = 65536,
    query_batch: int = 1024,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    gallery_block: int = 1 << 20,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k gallery items by dot product for every query.

  Args:
    queries: f32[Q, d].
    gallery: f32[N, d] (a memory-mapped array works: it is read block by block).
    k: results per query. If k exceeds the number of candidates (N, or N - 1
      under self-exclusion) the tail is padded with index -1 and score -inf.
    gallery_chunk: gallery rows scored per scan step (memory knob).
    query_batch: queries per jitted call (memory knob). The last batch is
      padded to the same size so one compilation serves all batches.
    exclude: optional ``(query_ids [Q], gallery_ids [N])`` for leave-one-out
      evaluation: gallery items whose id equals the query's id are never
      returned. Ids may be of any dtype.
    gallery_block: gallery rows on the device at once (rounded down to a
      multiple of `gallery_chunk`).

  Returns:
    ``(scores f32[Q, k], indices int32[Q, k])``, best first; ties go to the
    lower gallery index.
  """
  queries = _check(queries, None, k)
  if np.ndim(gallery) != 2 or np.shape(gallery)[1] != queries.shape[1]:
    raise ValueError(f"need [Q, d] and [N, d], got {queries.shape} and {np.shape(gallery)}")
  n = gallery.shape[0]
  if exclude is not None and (len(exclude[0]) != queries.shape[0] or len(exclude[1]) != n):
    raise ValueError("exclude ids must be [Q] and [N]")
  chunk = max(1, min(gallery_chunk, n))
  rows = max(chunk, gallery_block // chunk * chunk)
  return exact_top_k_blocks(queries, _row_blocks(gallery, rows), k, gallery_chunk=chunk, query_batch=query_batch,
                            exclude=exclude)


def fastest_exact_top_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    method: str = "auto",
    searcher=None,
) -> tuple[np.ndarray, np.ndarray]:
  """`exact_top_k`'s contract (ties: lower index first) by the backend's fastest exact method.

  Args:
    queries: f32[Q, d].
    gallery: f32[N, d] in memory.
    k: results per query.
    exclude: optional ``(query_ids [Q], gallery_ids [N])`` (leave-one-out).
    method: 'auto' (ScaNN brute force on CPU, JAX on accelerators), 'scann' or 'jax'.
    searcher: a brute-force `ScannIndex` over `gallery` to reuse (method 'scann'/'auto' on CPU).

  Returns:
    ``(scores f32[Q, k], indices int32[Q, k])``, best first.
  """
  if method not in ("auto", "scann", "jax"):
    raise ValueError(f"method={method!r}: use 'auto', 'scann' or 'jax'")
  if method == "auto":
    method = "scann" if jax.default_backend() == "cpu" else "jax"
  if method == "jax":
    return exact_top_k(queries, gallery, k, exclude=exclude)
  queries = _check(queries, np.shape(gallery)[1], k)
  if searcher is None:
    from oclear_jax.retrieval import scann_search  # pylint: disable=g-import-not-at-top  (loads TF)
    searcher = scann_search.ScannIndex.build(gallery, k=k, brute_force=True)
  return searcher.search(queries, k, exclude=exclude, parallel=True)
