"""Partial FC and the bf16 head against dense single-device references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oclear_jax import heads
from oclear_jax.heads import partial_fc

NUM_CLASSES, BATCH, DIM, SCALE, MARGIN = 37, 16, 12, 32.0, 0.35
BOTH = ("data", "model")


def _mesh(shape):
  return jax.make_mesh(shape, BOTH, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _inputs(c_pad, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  emb = jax.random.normal(k1, (BATCH, DIM)) * 3.0
  centers = jax.random.normal(k2, (c_pad, DIM))
  labels = jax.random.randint(k3, (BATCH,), 0, NUM_CLASSES, jnp.int32)
  return emb, labels, centers


def _dense_loss(emb, labels, centers, class_mask):
  """CosFace cross-entropy over the classes in `class_mask` (bool[C_pad]), written from scratch."""
  e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
  c = centers / jnp.linalg.norm(centers, axis=1, keepdims=True)
  cos = e @ c.T
  onehot = jnp.arange(centers.shape[0])[None, :] == labels[:, None]
  logits = SCALE * jnp.where(onehot, cos - MARGIN, cos)
  logits = jnp.where(class_mask[None, :], logits, -jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=1)
  return -jnp.mean(jnp.sum(jnp.where(onehot, logp, 0.0), axis=1))


def _sharded(mesh, rate, key, chunk=None, compute_dtype=jnp.float32, class_axes=BOTH, batch_axes=BOTH):
  def f(emb, labels, centers):
    return heads.margin_softmax_loss(
        emb, labels, centers, num_classes=NUM_CLASSES, margin_fn=heads.make_margin("cosface", scale=SCALE,
                                                                                   margin=MARGIN),
        mesh=mesh, batch_axes=batch_axes, class_axes=class_axes, chunk_size=chunk, partial_fc_rate=rate,
        sample_key=key, compute_dtype=compute_dtype)[0]
  return f


def _place(mesh, emb, labels, centers, batch_axes=BOTH, class_axes=BOTH):
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  return put(emb, P(batch_axes, None)), put(labels, P(batch_axes)), put(centers, P(class_axes, None))


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_rate_one_equals_full_softmax(shape, chunk):
  """At rate 1.0 the sampling path scores every class: loss and gradients equal the dense loss."""
  mesh = _mesh(shape)
  c_pad = heads.pad_num_classes(NUM_CLASSES, 8, chunk_size=chunk)
  emb, labels, centers = _inputs(c_pad)
  real = jnp.arange(c_pad) < NUM_CLASSES
  loss_ref, (ge_ref, gc_ref) = jax.value_and_grad(
      lambda e, c: _dense_loss(e, labels, c, real), argnums=(0, 1))(emb, centers)
  f = _sharded(mesh, 1.0, jax.random.key(3), chunk)
  e, l, c = _place(mesh, emb, labels, centers)
  loss, (ge, gc) = jax.jit(jax.value_and_grad(lambda e, c: f(e, l, c), argnums=(0, 1)))(e, c)
  for got, want in ((loss, loss_ref), (ge, ge_ref), (gc, gc_ref)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_sampler_keeps_every_positive_with_static_size():
  c_local, offset, num_sampled = 40, 80, 16
  for seed in range(20):
    labels = jax.random.randint(jax.random.key(seed), (12,), 60, 113)
    idx = np.asarray(partial_fc.sample_classes(jax.random.key(100 + seed), labels, jnp.int32(offset), c_local,
                                                    num_classes=113, num_sampled=num_sampled))
    assert idx.shape == (num_sampled,) and len(set(idx.tolist())) == num_sampled
    positives = {int(x) - offset for x in np.asarray(labels) if offset <= x < offset + c_local}
    assert positives <= set(idx.tolist())
    assert (idx + offset < 113).all()  # padding classes 113.. are never drawn while real ones remain


def test_sampled_count_never_drops_positives():
  assert partial_fc.num_sampled_classes(1000, rows=16, rate=0.1) == 100
  assert partial_fc.num_sampled_classes(1000, rows=256, rate=0.1) == 256  # every row's class fits
  assert partial_fc.num_sampled_classes(1000, rows=16, rate=0.1, chunk_size=64) == 100  # 2 chunks of 50
  assert partial_fc.num_sampled_classes(1000, rows=16, rate=0.101, chunk_size=64) == 102  # 2 chunks of 51
  assert partial_fc.num_sampled_classes(50, rows=256, rate=0.1) == 50
  with pytest.raises(ValueError, match="partial_fc_rate"):
    partial_fc.num_sampled_classes(1000, rows=16, rate=0.0)


@pytest.mark.parametrize("shape,batch_axes,class_axes", [((2, 4), BOTH, BOTH), ((2, 4), ("data",), ("model",))])
def test_partial_loss_equals_dense_loss_over_the_sample(shape, batch_axes, class_axes):
  """Rate 0.3: the loss is the dense softmax over the union of the shards' samples; unsampled centres get no gradient."""
  mesh = _mesh(shape)
  n_shards = heads.num_class_shards(mesh, class_axes)
  c_pad = heads.pad_num_classes(NUM_CLASSES * 4, n_shards)  # 148 real classes -> room to sample
  num_classes = NUM_CLASSES * 4
  emb, _, centers = _inputs(c_pad, seed=5)
  labels = jax.random.randint(jax.random.key(9), (BATCH,), 0, num_classes, jnp.int32)
  key = jax.random.key(11)
  c_local = c_pad // n_shards
  rows_per_group = BATCH // (mesh.shape["data"] if class_axes == ("model",) else 1)
  num_sampled = partial_fc.num_sampled_classes(c_local, rows_per_group, 0.3)
  assert num_sampled < c_local

  def f(e, l, c):
    return heads.margin_softmax_loss(
        e, l, c, num_classes=num_classes, margin_fn=heads.make_margin("cosface", scale=SCALE, margin=MARGIN),
        mesh=mesh, batch_axes=batch_axes, class_axes=class_axes, partial_fc_rate=0.3, sample_key=key)[0]
  e, l, c = _place(mesh, emb, labels, centers, batch_axes, class_axes)
  loss, gc = jax.jit(jax.value_and_grad(f, argnums=2))(e, l, c)

  # Reference: each row group sees the classes its shards sampled from that group's labels.
  groups = [np.arange(BATCH)] if class_axes == BOTH else np.split(np.arange(BATCH), mesh.shape["data"])
  per_row, sampled_any = [], np.zeros(c_pad, bool)
  for rows in groups:
    mask = np.zeros(c_pad, bool)
    for shard in range(n_shards):
      idx = partial_fc.sample_classes(jax.random.fold_in(key, shard), labels[rows], jnp.int32(shard * c_local),
                                           c_local, num_classes, num_sampled)
      mask[shard * c_local + np.asarray(idx)] = True
    assert mask[np.asarray(labels[rows])].all()
    sampled_any |= mask
    per_row.append(_dense_loss(emb[rows], labels[rows], centers, jnp.asarray(mask & (np.arange(c_pad) < num_classes)))
                   * len(rows))
  np.testing.assert_allclose(float(loss), float(sum(per_row)) / BATCH, rtol=1e-5)
  untouched = np.asarray(gc)[~sampled_any]
  assert untouched.size > 0 and np.all(untouched == 0)


@pytest.mark.parametrize("chunk", [None, 2])
def test_bf16_head_matches_f32_reference_and_keeps_bf16_centres(chunk):
  """bf16 operands and stored cosines, f32 statistics: the loss stays within bf16 rounding of the dense f32 loss."""
  mesh = _mesh((2, 4))
  c_pad = heads.pad_num_classes(NUM_CLASSES, 8, chunk_size=chunk)
  emb, labels, centers = _inputs(c_pad)
  real = jnp.arange(c_pad) < NUM_CLASSES
  loss_ref, gc_ref = jax.value_and_grad(lambda c: _dense_loss(emb, labels, c, real))(centers)
  e, l, c = _place(mesh, emb, labels, centers.astype(jnp.bfloat16))  # bf16 storage, as head.param_dtype does
  f = _sharded(mesh, None, None, chunk, compute_dtype=jnp.bfloat16)
  loss, gc = jax.jit(jax.value_and_grad(lambda c: f(e, l, c)))(c)
  assert gc.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=2e-2)
  cosine = np.sum(np.asarray(gc, np.float32) * np.asarray(gc_ref)) / (
      np.linalg.norm(np.asarray(gc, np.float32)) * np.linalg.norm(np.asarray(gc_ref)))
  assert cosine > 0.99, cosine


def test_trainer_step_with_partial_fc_and_bf16_centres_learns_a_fixed_batch():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from oclear_jax import sharding  # pylint: disable=g-import-not-at-top
  from oclear_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.head.partial_fc_rate = 0.25
  config.head.dtype = config.head.param_dtype = "bfloat16"
  config.optimizer.warmup_steps = 1
  mesh = sharding.make_mesh(config.mesh.shape)
  task = trainer.OclearTask(config, mesh, num_classes=400, vocab_size=300)
  _, shardings = task.abstract_state()
  state = task.init_state(jax.random.key(0), shardings)
  assert state["params"]["class_centers"].dtype == jnp.bfloat16
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32),
      "title_tokens": rng.integers(0, 300, (32, 16)).astype(np.int32),
      "label": rng.integers(0, 400, 32).astype(np.int32),
      "kind": rng.integers(0, 2, 32).astype(np.int32)}, mesh, task.rules)
  step = task.jit_train_step(shardings)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
