"""The head's faster paths (pre-sampled Partial FC rows, row-sparse Adam) and the small optimizer state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from oclear_jax import heads
from oclear_jax import sharding
from oclear_jax.heads import center_optimizer as co
from oclear_jax.heads import partial_fc
from oclear_jax.train import optimizer
from oclear_jax.train import trainer

BOTH = ("data", "model")
NUM_CLASSES, BATCH, DIM = 150, 16, 12


def _mesh():
  return jax.make_mesh((2, 4), BOTH, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _problem(mesh, seed=0, chunk=None):
  c_pad = heads.pad_num_classes(NUM_CLASSES, 8, chunk_size=chunk)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  emb = put(jax.random.normal(k1, (BATCH, DIM)) * 3.0, P(BOTH, None))
  centers = put(jax.random.normal(k2, (c_pad, DIM)), P(BOTH, None))
  labels = put(jax.random.randint(k3, (BATCH,), 0, NUM_CLASSES, jnp.int32), P(BOTH))
  return emb, labels, centers, c_pad


def _loss(mesh, **kw):
  margin = heads.make_margin("cosface", scale=32.0, margin=0.35)
  return lambda e, l, c: heads.margin_softmax_loss(e, l, c, num_classes=NUM_CLASSES, margin_fn=margin, mesh=mesh,
                                                   batch_axes=BOTH, class_axes=BOTH, **kw)[0]


def test_pre_sampled_rows_equal_the_in_loss_partial_fc(chunk=4):
  """Gathering the sampled rows first (the row-sparse step) gives the same loss and gradients,
  here through the chunked head (custom VJP) against the unchunked in-loss sampling."""
  mesh = _mesh()
  emb, labels, centers, c_pad = _problem(mesh)
  key = jax.random.key(7)
  loss_ref, (ge_ref, gc_ref) = jax.jit(jax.value_and_grad(
      lambda e, c: _loss(mesh, partial_fc_rate=0.3, sample_key=key)(e, labels, c), argnums=(0, 1)))(emb, centers)
  local_ids, class_ids = partial_fc.sample_class_rows(key, labels, num_classes=NUM_CLASSES, c_pad=c_pad, rate=0.3,
                                                      mesh=mesh, batch_axes=BOTH, class_axes=BOTH)
  rows = co.gather_rows(centers, local_ids, mesh, BOTH)
  loss, (ge, g_rows) = jax.jit(jax.value_and_grad(
      lambda e, r: _loss(mesh, class_ids=class_ids, chunk_size=chunk)(e, labels, r), argnums=(0, 1)))(emb, rows)
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ge), np.asarray(ge_ref), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_rows), np.asarray(gc_ref)[np.asarray(class_ids)], rtol=1e-4, atol=1e-6)
  # Scattering the row gradients back gives the dense gradient: unsampled rows get exactly zero.
  dense = co.scatter_rows(jnp.zeros_like(centers), local_ids, g_rows, mesh, BOTH)
  np.testing.assert_allclose(np.asarray(dense), np.asarray(gc_ref), rtol=1e-4, atol=1e-6)


def test_row_sparse_adam_equals_dense_adam_on_sampled_rows():
  """First step, no weight decay: dense AdamW moves only rows with a gradient, exactly as the lazy update."""
  mesh = _mesh()
  _, labels, centers, c_pad = _problem(mesh)
  local_ids, class_ids = partial_fc.sample_class_rows(jax.random.key(1), labels, num_classes=NUM_CLASSES,
                                                      c_pad=c_pad, rate=0.3, mesh=mesh, batch_axes=BOTH,
                                                      class_axes=BOTH)
  g_rows = jax.random.normal(jax.random.key(2), (class_ids.shape[0], DIM))
  grad = co.scatter_rows(jnp.zeros_like(centers), local_ids, g_rows, mesh, BOTH)
  tx = optax.adamw(1e-2, weight_decay=0.0)
  state = tx.init(centers)
  updates, state = tx.update(grad, state, centers)
  want = optax.apply_updates(centers, updates)
  rows = co.gather_rows(centers, local_ids, mesh, BOTH)
  zeros = jnp.zeros_like(rows)
  new_rows, mu, nu = co.sparse_adam_rows(rows, co.gather_rows(grad, local_ids, mesh, BOTH), zeros, zeros,
                                         jnp.int32(1), learning_rate=1e-2)
  got = co.scatter_rows(centers, local_ids, new_rows, mesh, BOTH)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(mu), np.asarray(co.gather_rows(state[0].mu, local_ids, mesh, BOTH)),
                             rtol=1e-6)


def test_center_adam_in_f32_is_adamw():
  params = jax.random.normal(jax.random.key(0), (40, 8))
  ref, ours = optax.adamw(1e-2, weight_decay=1e-3), co.center_adam(
      1e-2, weight_decay=1e-3, state_dtype=jnp.float32, factored=False, stochastic_rounding=False)
  p_ref, p_ours, s_ref, s_ours = params, params, ref.init(params), ours.init(params)
  for i in range(5):
    g = jax.random.normal(jax.random.key(10 + i), params.shape)
    u, s_ref = ref.update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    u, s_ours = ours.update(g, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
  np.testing.assert_allclose(np.asarray(p_ours), np.asarray(p_ref), rtol=1e-5, atol=1e-6)


def test_small_state_tracks_f32_adam_on_a_small_problem():
  """bf16 centres and moments, f32 math, stochastic rounding, on the chunked head, 30 steps.

  Unfactored, the loss curve stays within 5% of f32 AdamW's; factored (rank-1 second moment), the
  trajectory differs by design, so the check is that it ends no worse than 5% above f32 AdamW.
  """
  mesh = _mesh()
  emb, labels, centers, _ = _problem(mesh, seed=3, chunk=5)
  loss_fn = _loss(mesh, chunk_size=5)
  curves = {}
  for name, tx, dtype in (("f32", optax.adamw(3e-2, weight_decay=1e-4), jnp.float32),
                          ("bf16", co.center_adam(3e-2, weight_decay=1e-4, factored=False), jnp.bfloat16),
                          ("factored", co.center_adam(3e-2, weight_decay=1e-4), jnp.bfloat16)):
    c = centers.astype(dtype)
    state = tx.init(c)

    @jax.jit
    def step(c, state, tx=tx):
      value, g = jax.value_and_grad(lambda c: loss_fn(emb, labels, c))(c)
      u, state = tx.update(g, state, c)
      return optax.apply_updates(c, u), state, value
    curve = []
    for _ in range(30):
      c, state, value = step(c, state)
      curve.append(float(value))
    assert c.dtype == dtype
    curves[name] = np.array(curve)
  assert curves["f32"][-1] < 0.7 * curves["f32"][0]  # it learned something
  np.testing.assert_allclose(curves["bf16"], curves["f32"], rtol=0.05)
  assert curves["factored"][-1] <= 1.05 * curves["f32"][-1], (curves["factored"][-1], curves["f32"][-1])


def test_stochastic_rounding_is_unbiased():
  x = jnp.full((512, 64), 1.0 + 2.0**-10)  # a quarter of a bf16 ulp above 1: round-to-nearest gives 1.0
  assert float(jnp.mean(co.round_to(x, jnp.bfloat16, False, jnp.int32(1)).astype(jnp.float32))) == 1.0
  means = [float(jnp.mean(co.round_to(x, jnp.bfloat16, True, jnp.int32(s)).astype(jnp.float32))) for s in (1, 2)]
  np.testing.assert_allclose(means, 1.0 + 2.0**-10, rtol=2e-5)
  assert means[0] != means[1]  # a new draw each step


def test_trainer_gives_the_centres_the_small_state_and_everything_else_adamw():
  """optimizer.centres_state='small': class_centers get center_adam, other parameters optax AdamW
  exactly as with 'adamw'; the factored second moment's row is sharded by class like the centres."""
  config = tiny.get_config()
  config.optimizer.update(centres_state="small", warmup_steps=0, grad_clip_norm=0.0, learning_rate=1e-2)
  rng = np.random.default_rng(0)
  params = {"encoder": {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
                        "b": jnp.asarray(rng.standard_normal(5), jnp.float32)},
            "class_centers": jnp.asarray(rng.standard_normal((40, 5)), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  small = optimizer.make_optimizer(config.optimizer, 10)
  updates, _ = small.update(grads, small.init(params), params)
  plain_config = config.optimizer.copy_and_resolve_references()
  plain_config.centres_state = "adamw"
  plain = optimizer.make_optimizer(plain_config, 10)
  want, _ = plain.update(grads, plain.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, updates["encoder"], want["encoder"])
  reference = co.center_adam(1e-2, weight_decay=config.optimizer.weight_decay)  # step 0 of a 0-warmup cosine: lr
  want_centres, _ = reference.update(grads["class_centers"], reference.init(params["class_centers"]),
                                     params["class_centers"])
  np.testing.assert_array_equal(updates["class_centers"], want_centres)
  assert not np.allclose(updates["class_centers"], want["class_centers"])  # not AdamW's update

  mesh = sharding.make_mesh((4, 2))
  task = trainer.OclearTask(config, mesh, num_classes=37, vocab_size=300)
  abstract, shardings = task.abstract_state()
  by_path = lambda tree: {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  specs = by_path(shardings["opt_state"])  # keyed by path: masked parameters have a spec but no array
  leaves = {path: (leaf, specs[path]) for path, leaf in by_path(abstract["opt_state"]).items()}
  rows = [(leaf, s) for leaf, s in leaves.values() if leaf.shape == (task.padded_classes,)]
  firsts = [leaf for leaf, _ in leaves.values()
            if leaf.shape == (task.padded_classes, config.model.embed_dim) and leaf.dtype == jnp.bfloat16]
  assert len(rows) == 1 and len(firsts) == 1, sorted(leaves)
  first_spec = specs["[1].inner_states['centres'].inner_state.mu['class_centers']"]
  assert tuple(rows[0][1].spec) == tuple(first_spec.spec)[:1] == (tuple(sharding.mesh_axes("classes", task.rules)),)
