"""train.both_views: every row is a sample of its class through the query head and the document head.

A catalogue without shopper photos (the Myntra sample) has only documents; trained one view per
row, its query head never gets a gradient and evaluation compares an untrained query head with a
trained document head. The reference is a dense single-device CosFace written from scratch.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from oclear_jax import sharding
from oclear_jax.train import trainer

NUM_CLASSES, VOCAB, BATCH = 12, 300, 8


def _task(both_views: bool):
  config = tiny.get_config()  # mesh (4, 2): the batch and the classes are sharded
  config.train.both_views = both_views
  return trainer.OclearTask(config, sharding.make_mesh(config.mesh.shape), num_classes=NUM_CLASSES,
                            vocab_size=VOCAB)


def _documents_only_batch(config):
  rng = np.random.default_rng(0)
  size, length = config.data.stored_image_size, config.data.max_title_len
  titles = np.zeros((BATCH, length), np.int32)
  titles[:, 0], titles[:, 1:6], titles[:, 6] = 2, rng.integers(4, VOCAB, (BATCH, 5)), 3
  return dict(image=rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32), title_tokens=titles,
              label=rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32), kind=np.zeros(BATCH, np.int32))


def _dense_cosface(embeddings, labels, centers, scale, margin):
  c = centers[:NUM_CLASSES] / jnp.linalg.norm(centers[:NUM_CLASSES], axis=1, keepdims=True)
  cos = embeddings @ c.T
  onehot = jnp.arange(NUM_CLASSES)[None, :] == labels[:, None]
  logp = jax.nn.log_softmax(scale * jnp.where(onehot, cos - margin, cos), axis=1)
  return -jnp.mean(jnp.sum(jnp.where(onehot, logp, 0.0), axis=1))


def test_both_views_loss_matches_a_dense_reference():
  task = _task(True)
  _, shardings = task.abstract_state()
  state = task.init_state(jax.random.key(0), shardings)
  host = _documents_only_batch(task.config)
  rng = jax.random.key(3)
  with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
    loss, _ = jax.jit(task.loss_fn)(state["params"], sharding.global_batch(host, task.mesh, task.rules), rng)
  params = jax.device_get(state["params"])
  dropout_rng, _ = jax.random.split(rng)  # loss_fn's split
  encoder = {"params": params["encoder"]}
  queries = task.model.apply(encoder, host["image"], method="embed_queries")
  tokens, pooled = task.model.apply(encoder, host["image"], False, method="_image_features")
  title = task.model.apply(encoder, host["title_tokens"], True, method="_title_features",
                           rngs={"dropout": dropout_rng})
  documents = task.model.apply(encoder, tokens, pooled, title, train=True, method="documents_from_features",
                               rngs={"dropout": dropout_rng})
  head = task.config.head
  expected = _dense_cosface(jnp.concatenate([queries, documents]), np.concatenate([host["label"]] * 2),
                            params["class_centers"], head.scale, head.margin_value)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


@pytest.mark.parametrize("both_views", [True, False])
def test_a_documents_only_catalogue_trains_the_query_head_only_with_both_views(both_views):
  task = _task(both_views)
  _, shardings = task.abstract_state()
  state = task.init_state(jax.random.key(0), shardings)
  batch = sharding.global_batch(_documents_only_batch(task.config), task.mesh, task.rules)
  with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(p, batch, jax.random.key(1))[0]))(state["params"])
  query_head = [np.abs(np.asarray(g)).max() for g in jax.tree_util.tree_leaves(grads["encoder"]["query_head"])]
  doc_head = [np.abs(np.asarray(g)).max() for g in jax.tree_util.tree_leaves(grads["encoder"]["doc_head"])]
  assert max(doc_head) > 0
  if both_views:
    assert min(query_head) > 0
  else:
    assert max(query_head) == 0
