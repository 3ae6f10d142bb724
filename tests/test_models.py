"""oclear_jax.models: shapes, logical names only, exact image-only fallback, heads, sharded == unsharded."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oclear_jax import models
import sharded_init

LOGICAL_AXES = {"batch", "length", "embed", "mlp", "heads", "kv", "vocab", "patch", "proj"}
MESH_AXES = {"data", "model"}
B, SIZE, PATCH, L, VOCAB, EMBED = 8, 32, 8, 12, 64, 16
CLS, SEP = 2, 3


def _config(**overrides):
  base = dict(image_tower="vit", vit=dict(width=32, depth=2, num_heads=2, mlp_dim=64), patch_size=PATCH,
              text=dict(width=32, depth=1, num_heads=2, mlp_dim=64, pool="mean"), embed_dim=EMBED,
              head_hidden=32, fusion="gated", title_dropout=0.0, shared_heads=False)
  base.update(overrides)
  return base


def _model(**overrides) -> models.OclearModel:
  return models.build_model(_config(**overrides), vocab_size=VOCAB, max_title_len=L)


def _batch():
  images = jax.random.uniform(jax.random.key(1), (B, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)
  words = jax.random.randint(jax.random.key(2), (B, 5), 4, VOCAB)
  titles = jnp.zeros((B, L), jnp.int32).at[:, 0].set(CLS).at[:, 1:6].set(words).at[:, 6].set(SEP)
  is_query = jnp.arange(B) % 2 == 0
  return images, titles, is_query


def _empty_titles():
  """Half [CLS][SEP] then padding, half all padding: both count as no title."""
  cls_sep = jnp.zeros((B, L), jnp.int32).at[:, 0].set(CLS).at[:, 1].set(SEP)
  return jnp.where((jnp.arange(B) % 2 == 0)[:, None], cls_sep, 0)


def _init(model, rng=0):
  images, titles, is_query = _batch()
  return model.init({"params": jax.random.key(rng)}, images, titles, is_query)


def _assert_unit_norm(x):
  np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=-1), 1.0, atol=1e-5)


def test_tower_shapes():
  images, titles, _ = _batch()
  vit = models.ViTEncoder(patch_size=PATCH, width=32, depth=1, num_heads=2, mlp_dim=64)
  (tokens, pooled), _ = vit.init_with_output(jax.random.key(0), images)
  assert tokens.shape == (B, (SIZE // PATCH) ** 2, 32) and pooled.shape == (B, 32)
  vit_cls = models.ViTEncoder(patch_size=PATCH, width=32, depth=1, num_heads=2, mlp_dim=64, pool="cls")
  (tokens, pooled), _ = vit_cls.init_with_output(jax.random.key(0), images)
  assert tokens.shape == (B, (SIZE // PATCH) ** 2 + 1, 32) and pooled.shape == (B, 32)
  text = models.TextEncoder(vocab_size=VOCAB, max_len=L, width=32, depth=1, num_heads=2, mlp_dim=64)
  (tokens, pooled, mask), variables = text.init_with_output(jax.random.key(0), titles)
  assert tokens.shape == (B, L, 32) and pooled.shape == (B, 32) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask.sum(axis=1), 7)
  # Extra padding changes nothing: pad keys are masked and the mean skips them.
  _, pooled_short, _ = text.apply(variables, titles[:, :8])
  np.testing.assert_allclose(pooled_short, pooled, atol=1e-5)
  assert models.VIT_PRESETS["mu"] == (128, 3, 4, 256)


def test_model_outputs_are_unit_embeddings():
  model = _model()
  variables = _init(model)
  images, titles, is_query = _batch()
  queries = model.apply(variables, images, method="embed_queries")
  docs = model.apply(variables, images, titles, method="embed_documents")
  mixed = model.apply(variables, images, titles, is_query)
  for x in (queries, docs, mixed):
    assert x.shape == (B, EMBED) and x.dtype == jnp.float32
    _assert_unit_norm(x)
  expected = jnp.where(is_query[:, None], queries, docs)
  np.testing.assert_allclose(mixed, expected, atol=1e-5)


def test_parameters_carry_logical_names_only():
  model = _model(vit=dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  abstract = jax.eval_shape(lambda r: _init(model, r), 0)
  boxes = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  specs = jax.tree_util.tree_leaves(nn.get_partition_spec(abstract), is_leaf=lambda x: isinstance(x, P))
  assert len(specs) == len(boxes)
  for box, spec in zip(boxes, specs):
    assert len(spec) == box.value.ndim, (box.names, box.value.shape)
    assert all(name in LOGICAL_AXES for name in spec), spec
    assert not MESH_AXES & set(spec), spec


@pytest.mark.parametrize("fusion", ["gated", "sum"])
def test_empty_title_gives_exactly_the_image_only_embedding(fusion):
  model = _model(fusion=fusion)
  variables = _init(model)
  images, titles, _ = _batch()
  image_only = _model(fusion="image_only")
  image_params = {k: v for k, v in variables["params"].items() if k not in ("text_encoder", "doc_fusion")}
  expected = image_only.apply({"params": image_params}, images, None, method="embed_documents")
  empty = model.apply(variables, images, _empty_titles(), method="embed_documents")
  np.testing.assert_array_equal(np.asarray(empty), np.asarray(expected))
  with_title = model.apply(variables, images, titles, method="embed_documents")
  assert np.abs(np.asarray(with_title) - np.asarray(expected)).max() > 1e-3


def test_title_presence_flags():
  tokens = jnp.array([[CLS, SEP, 0, 0], [0, 0, 0, 0], [CLS, 1, SEP, 0], [CLS, 9, 9, SEP]], jnp.int32)
  np.testing.assert_array_equal(models.title_present(tokens), [False, False, True, True])


@pytest.mark.parametrize("shared", [False, True])
def test_query_and_doc_heads(shared):
  model = _model(shared_heads=shared)
  variables = _init(model)
  images, _, _ = _batch()
  queries = model.apply(variables, images, method="embed_queries")
  docs = model.apply(variables, images, _empty_titles(), method="embed_documents")
  if shared:
    assert "shared_head" in variables["params"] and "query_head" not in variables["params"]
    np.testing.assert_allclose(queries, docs, atol=1e-6)
  else:
    assert {"query_head", "doc_head"} <= set(variables["params"])
    assert np.abs(np.asarray(queries) - np.asarray(docs)).max() > 1e-3


def test_title_dropout_removes_whole_titles_in_training():
  images, titles, _ = _batch()
  variables = _init(_model())
  empty = _model().apply(variables, images, _empty_titles(), method="embed_documents")
  rngs = {"dropout": jax.random.key(3)}
  dropped = _model(title_dropout=1.0).apply(variables, images, titles, train=True, rngs=rngs,
                                            method="embed_documents")
  np.testing.assert_allclose(dropped, empty, atol=1e-6)
  kept = _model(title_dropout=0.0).apply(variables, images, titles, train=True, rngs=rngs,
                                         method="embed_documents")
  assert np.abs(np.asarray(kept) - np.asarray(empty)).max() > 1e-3
  # Evaluation never drops titles (and needs no rng).
  evaluated = _model(title_dropout=1.0).apply(variables, images, titles, method="embed_documents")
  np.testing.assert_allclose(evaluated, kept, atol=1e-6)


def test_build_model_rejects_unknown_names():
  with pytest.raises(ValueError, match=r"image_tower='resnet'.*registered: \[.*'vit'.*\]"):
    _model(image_tower="resnet")
  with pytest.raises(ValueError, match=r"fusion='concat'.*image_only"):
    _model(fusion="concat")
  with pytest.raises(ValueError, match=r"model.vit='huge'.*'mu'"):
    _model(vit="huge")


def test_build_model_from_config_schema():
  from oclear_jax import config_schema  # pylint: disable=g-import-not-at-top
  config = config_schema.base_config()
  model = models.build_model(config.model, vocab_size=VOCAB, max_title_len=L)
  assert model.image_encoder.width == 128 and model.fusion == "gated" and model.title_dropout == 0.1
  assert model.text_encoder.width == config.model.text.width


def test_sharded_apply_matches_single_device():
  rules = (("batch", "data"), ("mlp", "model"), ("heads", "model"), ("vocab", "model"))
  model = _model()
  images, titles, is_query = _batch()
  mesh, variables = sharded_init.init_sharded(model, (images, titles, is_query), rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert variables["params"]["text_encoder"]["token_embed"]["embedding"].sharding.spec == P("model", None)
    fc1 = variables["params"]["image_encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P(None, "model")
    batch_sharding = NamedSharding(mesh, P("data"))
    placed = [jax.device_put(x, batch_sharding) for x in (images, titles, is_query)]
    sharded = jax.jit(model.apply)(variables, *placed)
    assert sharded.sharding.spec[0] == "data"

  host_variables = jax.device_get(variables)
  single = jax.jit(model.apply)(host_variables, images, titles, is_query)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
