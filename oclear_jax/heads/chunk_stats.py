"""One device's row statistics over its own classes: a block of logits, and the chunk loop.

`local_stats(emb_n, labels, centers, gidx, ...)` returns per row the online log-sum-exp pieces
(max `m`, exp-sum `s`, target logit `t`) plus the best non-target and the target cosine, over this
device's (sampled) class shard; `sharded_softmax` combines them across devices with pmax/psum.

Unchunked, autodiff keeps the [rows, classes] block. Chunked, the loop has its own VJP
(`_chunked_stats_vjp`): the forward keeps nothing per chunk, the backward rescans the chunks once,
recomputing each block of logits and writing the centres' gradient in place; bf16 centres pass
through the loop as raw 16-bit integers (XLA:CPU would otherwise copy the shard to f32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from oclear_jax.heads.class_shards import num_chunks

# Padding logit: exp(_NEG - max) underflows to exactly 0, and unlike -inf it
# never produces inf - inf = nan in the online max updates.
_NEG = -1e30
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  # max(|x|^2, eps) keeps all-zero (padding) rows finite in value and grad.
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS))


def _chunk_stats(emb_n, labels, centers, gidx, *, num_classes, margin_fn,
                 compute_dtype) -> dict[str, jax.Array]:
  """Row statistics of one block of classes with global indices ``gidx``.

  Returns a dict of [rows] vectors: ``m`` (max logit, no grad), ``s``
  (sum exp(logit - m)), ``t`` (target logit, 0 if not in block), ``cmax``
  (max valid cosine, for accuracy) and ``tcos`` (target cosine).
  """
  cos = jnp.matmul(emb_n.astype(compute_dtype),
                   l2_normalize(centers.astype(jnp.float32)).astype(
                       compute_dtype).T,
                   preferred_element_type=jnp.float32)
  # The [R, K] block is stored in compute_dtype; everything after is f32.
  cos = cos.astype(compute_dtype).astype(jnp.float32)
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


def local_stats(emb_n, labels, centers, gidx, *, num_classes, margin_fn,
                 chunk_size, compute_dtype):
  """Row statistics over this device's (sampled) classes, optionally chunked.

  ``gidx``: the rows' global class ids, or a scalar: the id of row 0 of a
  contiguous shard (chunks then make their ids on the fly, so no O(C/N)
  index vector is stored).
  """
  c_local = centers.shape[0]
  n_chunks = num_chunks(c_local, chunk_size)
  if n_chunks == 1:  # autodiff keeps the [rows, classes] block: 3 matmuls
    return _chunk_stats(emb_n, labels, centers, _ids(gidx, 0, c_local), num_classes=num_classes,
                        margin_fn=margin_fn, compute_dtype=compute_dtype)
  fn = functools.partial(_chunked_stats, n_chunks=n_chunks,
                         num_classes=num_classes, margin_fn=margin_fn,
                         compute_dtype=compute_dtype)
  # The custom backward's gradients vary over every axis the rows and the
  # classes do: type all inputs that way up front, so that autodiff of these
  # casts (psums) reduces them, as it does for the unchunked path.
  args = (emb_n, labels, centers, gidx)
  emb_n, labels, centers, gidx = (_vary_like(x, *args) for x in args)
  out = _chunked_stats_vjp(fn)(emb_n, labels, centers, gidx)
  # Only s and t carry gradients (the backward ignores the others' cotangents).
  return {k: v if k in ("s", "t") else jax.lax.stop_gradient(v)
          for k, v in out.items()}


def _chunked_stats(emb_n, labels, centers, gidx, *, n_chunks, num_classes,
                   margin_fn, compute_dtype):
  """Forward: one loop over equal chunks with an online log-sum-exp.

  Chunks are dynamic slices of the [C_local, d] shard (no stacked copy); the
  carry starts neutral (max -1e30, sums 0), typed like the rows.
  """
  stats = functools.partial(_chunk_stats, num_classes=num_classes,
                            margin_fn=margin_fn, compute_dtype=compute_dtype)
  k = centers.shape[0] // n_chunks
  rows = emb_n.shape[:1]
  init = dict(m=jnp.full(rows, _NEG), s=jnp.zeros(rows), t=jnp.zeros(rows),
              cmax=jnp.full(rows, _NEG), tcos=jnp.zeros(rows))
  init = {n: _vary_like(v, emb_n, centers) for n, v in init.items()}

  bits = _as_bits(centers)

  def body(i, carry):
    chunk = _from_bits(jax.lax.dynamic_slice_in_dim(bits, i * k, k), centers.dtype)
    return _combine(carry, stats(emb_n, labels, chunk, _ids(gidx, i, k)))

  return jax.lax.fori_loop(0, n_chunks, body, init)


def _ids(gidx, i, k):
  """Global class ids of chunk i: a slice of a vector, or first id + i*k + iota."""
  if gidx.ndim:
    return jax.lax.dynamic_slice_in_dim(gidx, i * k, k)
  return gidx + i * k + jnp.arange(k, dtype=jnp.int32)


def _chunked_stats_vjp(fn):
  """``fn`` with a backward pass that rescans the chunks (custom VJP).

  Autodiff of a scan would save every chunk's logits (or, rematerialised,
  replay the whole forward body per chunk). Here the forward keeps only its
  inputs and the final row max ``m``; the backward rescans the chunks once,
  recomputing each [rows, chunk] cosine block (one matmul) and turning it into
  d(cosine) = margin'(cos) * (ds * exp(logit - m) + dt * onehot) in one fused
  elementwise pass, then two matmuls give the embedding gradient (a carry) and
  the chunk's centre gradient (a scan output, written in the centres' dtype
  straight into the [chunks, chunk, d] buffer that *is* the shard gradient).
  4 matmuls per chunk instead of 3, and O(rows x chunk) temporaries.
  """

  @jax.custom_vjp
  def f(emb_n, labels, centers, gidx):
    return fn(emb_n, labels, centers, gidx)

  def fwd(emb_n, labels, centers, gidx):
    out = fn(emb_n, labels, centers, gidx)
    return out, (emb_n, labels, centers, gidx, out["m"])

  def bwd(res, ct):
    emb_n, labels, centers, gidx, m = res
    kw = fn.keywords
    n_chunks, cd = kw["n_chunks"], kw["compute_dtype"]
    ds, dt = ct["s"], ct["t"]
    e_cd = emb_n.astype(cd)
    k = centers.shape[0] // n_chunks
    bits = _as_bits(centers)

    def body(i, carry):
      de, dcenters = carry
      chunk = _from_bits(jax.lax.dynamic_slice_in_dim(bits, i * k, k), centers.dtype)
      g = _ids(gidx, i, k)
      c_n, norm_vjp = jax.vjp(
          lambda c: l2_normalize(c.astype(jnp.float32)).astype(cd), chunk)
      cos = jnp.einsum("rd,kd->rk", e_cd, c_n,
                       preferred_element_type=jnp.float32)
      cos = cos.astype(cd).astype(jnp.float32)
      valid = (g < kw["num_classes"])[None, :]
      tmask = labels[:, None] == g[None, :]
      logits, margin_vjp = jax.vjp(
          lambda x: jnp.where(valid, kw["margin_fn"](x, tmask), _NEG), cos)
      dlogits = (ds[:, None] * jnp.exp(logits - m[:, None])
                 + jnp.where(tmask, dt[:, None], 0.0))
      dcos = margin_vjp(dlogits)[0].astype(cd)
      de = de + jnp.einsum("rk,kd->rd", dcos, c_n,
                           preferred_element_type=jnp.float32)
      dc_n = jnp.einsum("rk,rd->kd", dcos, e_cd,
                        preferred_element_type=jnp.float32)
      dchunk = norm_vjp(dc_n.astype(cd))[0].astype(centers.dtype)
      return de, jax.lax.dynamic_update_slice_in_dim(dcenters, _as_bits(dchunk), i * k, 0)

    init = (jnp.zeros(emb_n.shape, jnp.float32), jnp.zeros_like(bits))
    init = tuple(_vary_like(x, emb_n, centers) for x in init)
    de, dcenters = jax.lax.fori_loop(0, n_chunks, body, init)
    return de.astype(emb_n.dtype), None, _from_bits(dcenters, centers.dtype), None

  f.defvjp(fwd, bwd)
  return f


def _as_bits(x):
  """bf16 loop operands travel as uint16: XLA:CPU otherwise widens a bf16
  dynamic slice / update to f32 and hoists that convert out of the loop (a
  whole f32 copy of the shard). A free bitcast on every backend."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _from_bits(x, dtype):
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def _vma(x) -> frozenset:
  """Mesh axes ``x`` varies over inside shard_map (jax 0.10: manual_axis_type)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _vary_like(x, *others):
  """``x`` typed as varying over every mesh axis ``others`` vary over."""
  missing = frozenset().union(*map(_vma, others)) - _vma(x)
  return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x
