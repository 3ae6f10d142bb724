"""Fusion modes, concept-memory fusion against a numpy reference, frozen and pretrained towers."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oclear_jax import models
import sharded_init

LOGICAL_AXES = {"batch", "length", "embed", "mlp", "heads", "kv", "vocab", "patch", "proj", "concepts"}
B, SIZE, PATCH, L, VOCAB, EMBED, SLOTS = 8, 32, 8, 12, 64, 16, 4
CLS, SEP = 2, 3
# The parameters each fusion mode adds under params/doc_fusion (None: no fusion parameters at all).
FUSION_PARAMS = {
    "image_only": None,
    "sum": {"text_proj"},
    "gated": {"text_proj", "gate"},
    "bounded": {"text_proj", "title_weight"},
    "concat_mlp": {"fc1", "fc2"},
    "concept_attention": {"concept_memory"},
}


def _model(**overrides) -> models.OclearModel:
  config = dict(image_tower="vit", vit=dict(width=32, depth=1, num_heads=2, mlp_dim=64), patch_size=PATCH,
                text=dict(width=24, depth=1, num_heads=2, mlp_dim=48, pool="mean"), embed_dim=EMBED,
                head_hidden=32, fusion="concept_attention", title_dropout=0.0, concept_slots=SLOTS,
                concept_heads=2)
  config.update(overrides)
  return models.build_model(config, vocab_size=VOCAB, max_title_len=L)


def _batch():
  images = jax.random.uniform(jax.random.key(1), (B, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)
  words = jax.random.randint(jax.random.key(2), (B, 5), 4, VOCAB)
  titles = jnp.zeros((B, L), jnp.int32).at[:, 0].set(CLS).at[:, 1:6].set(words).at[:, 6].set(SEP)
  return images, titles, jnp.arange(B) % 2 == 0


def _empty_titles():
  cls_sep = jnp.zeros((B, L), jnp.int32).at[:, 0].set(CLS).at[:, 1].set(SEP)
  return jnp.where((jnp.arange(B) % 2 == 0)[:, None], cls_sep, 0)


# == The bounded title term ======================================================================
def test_bounded_fusion_matches_reference_and_bounds_the_title_term():
  """doc = unit(img) + a * unit(proj(title)); at a = 0 (init) exactly the image direction."""
  rng = np.random.default_rng(0)
  img, pooled = rng.normal(size=(B, EMBED)).astype(np.float32), rng.normal(size=(B, 24)).astype(np.float32)
  present = np.arange(B) % 3 != 0
  title = models.TitleFeatures(jnp.zeros((B, L, 24)), jnp.asarray(pooled), jnp.ones((B, L), bool),
                               jnp.asarray(present))
  fusion = models.DocumentFusion("bounded")
  variables = fusion.init(jax.random.key(0), jnp.asarray(img), title)
  params = nn.unbox(variables)["params"]
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  at_init = np.asarray(fusion.apply({"params": params}, jnp.asarray(img), title))
  np.testing.assert_allclose(unit(at_init), unit(img), rtol=1e-6, atol=1e-6)
  params = {**params, "title_weight": jnp.float32(0.4)}
  out = np.asarray(fusion.apply({"params": params}, jnp.asarray(img), title))
  text = pooled @ np.asarray(params["text_proj"]["kernel"]) + np.asarray(params["text_proj"]["bias"])
  expected = np.where(present[:, None], unit(img) + 0.4 * unit(text), img)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # Whatever the projection learns, the title term is 0.4 of the unit image term.
  big = jax.tree.map(lambda p: p * 1e3, params["text_proj"])
  out_big = np.asarray(fusion.apply({"params": {**params, "text_proj": big}}, jnp.asarray(img), title))
  np.testing.assert_allclose(np.linalg.norm(out_big[present] - unit(img[present]), axis=-1), 0.4, rtol=1e-5)


# == Shapes and logical names ====================================================================
@pytest.mark.parametrize("fusion", sorted(FUSION_PARAMS))
def test_fusion_mode_shapes_and_logical_names(fusion):
  model = _model(fusion=fusion)
  images, titles, is_query = _batch()
  boxed = jax.eval_shape(lambda r: model.init(r, images, titles, is_query), jax.random.key(0))["params"]
  boxes = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  for box in boxes:
    assert len(box.names) == box.value.ndim and set(box.names) <= LOGICAL_AXES, (box.names, box.value.shape)
  expected = FUSION_PARAMS[fusion]
  assert (set(boxed["doc_fusion"]) if "doc_fusion" in boxed else None) == expected
  assert ("text_encoder" in boxed) == (fusion != "image_only")
  if fusion == "concept_attention":
    memory = boxed["doc_fusion"]["concept_memory"]
    assert memory["slots"].value.shape == (SLOTS, EMBED) and memory["slots"].names == ("concepts", "embed")
    assert memory["null_token"].value.shape == (24,)  # the text tower's width: the null key sits among tokens
    assert memory["read"]["key_kernel"].value.shape == (24, 2, EMBED // 2)
    assert memory["image_proj"]["kernel"].value.shape == (32, EMBED)  # from the image tower's width
    assert memory["ground"]["key_kernel"].value.shape == (EMBED, 2, EMBED // 2)
  variables = model.init(jax.random.key(0), images, titles, is_query)
  for out in (model.apply(variables, images, titles, is_query),
              model.apply(variables, images, titles, method="embed_documents"),
              model.apply(variables, images, method="embed_queries")):
    assert out.shape == (B, EMBED) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, atol=1e-5)


# == Empty titles and the gate ===================================================================
@pytest.mark.parametrize("fusion", ["concept_attention", "concat_mlp"])
def test_empty_title_is_exactly_the_image_only_path(fusion):
  model = _model(fusion=fusion)
  images, titles, is_query = _batch()
  variables = model.init(jax.random.key(0), images, titles, is_query)
  image_params = {k: v for k, v in variables["params"].items() if k not in ("text_encoder", "doc_fusion")}
  expected = _model(fusion="image_only").apply({"params": image_params}, images, None, method="embed_documents")
  empty = model.apply(variables, images, _empty_titles(), method="embed_documents")
  np.testing.assert_array_equal(np.asarray(empty), np.asarray(expected))
  titled = model.apply(variables, images, titles, method="embed_documents")
  assert np.abs(np.asarray(titled) - np.asarray(expected)).max() > 1e-3
  # Title dropout at rate 1 in training removes every title: the image-only path again.
  dropped = _model(fusion=fusion, title_dropout=1.0).apply(
      variables, images, titles, train=True, rngs={"dropout": jax.random.key(3)}, method="embed_documents")
  np.testing.assert_array_equal(np.asarray(dropped), np.asarray(expected))


def test_concept_gate_closes_for_empty_titles_only():
  model = _model()
  images, titles, is_query = _batch()
  variables = model.init(jax.random.key(0), images, titles, is_query)
  mixed = jnp.where((jnp.arange(B) < B // 2)[:, None], titles, _empty_titles())
  _, state = model.apply(variables, images, mixed, method="embed_documents", mutable=["intermediates"])
  (gate,) = state["intermediates"]["doc_fusion"]["concept_memory"]["title_gate"]
  gate = np.asarray(gate)
  assert gate.shape == (B, EMBED)
  np.testing.assert_array_equal(gate[B // 2:], 0.0)
  assert gate[: B // 2].min() > 0.0
  # Image-dominant at init: the gate's bias starts at -2, so gates sit near sigmoid(-2) = 0.12.
  assert 0.02 < gate[: B // 2].mean() < 0.4


# == The concept memory against a numpy reference ================================================
def _ln(x, p, eps=1e-6):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _cross_attention(queries, inputs, mask, p):
  q = np.einsum("bqe,ehk->bqhk", queries, p["query_kernel"]) + p["query_bias"]
  k = np.einsum("bne,ehk->bnhk", inputs, p["key_kernel"]) + p["key_bias"]
  v = np.einsum("bne,ehk->bnhk", inputs, p["value_kernel"]) + p["value_bias"]
  logits = np.einsum("bqhk,bnhk->bhqn", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum("bhqn,bnhk->bqhk", weights, v)
  return np.einsum("bqhk,hke->bqe", y, p["out_kernel"]) + p["out_bias"], weights


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _concept_memory_reference(p, img_emb, image_tokens, text_tokens, text_mask, present):
  """The formulation in concept_memory's docstring, written out in numpy."""
  b = img_emb.shape[0]
  text = _ln(text_tokens, p["ln_text"])
  text = np.concatenate([np.broadcast_to(p["null_token"], (b, 1, text.shape[-1])), text], axis=1)
  mask = np.concatenate([np.ones((b, 1), bool), text_mask], axis=1)
  queries = np.broadcast_to(_ln(p["slots"], p["ln_slots"]), (b,) + p["slots"].shape)
  read, weights = _cross_attention(queries, text, mask, p["read"])
  concepts = p["slots"] + read
  read_mass = 1.0 - weights[..., 0].mean(axis=1)
  image = _ln(image_tokens, p["ln_image"]) @ p["image_proj"]["kernel"] + p["image_proj"]["bias"]
  z, _ = _cross_attention(_ln(concepts, p["ln_concepts"]), image, None, p["ground"])
  h = _ln(z, p["ln_mlp"])
  z = z + _gelu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]) @ p["mlp"]["fc2"]["kernel"] \
      + p["mlp"]["fc2"]["bias"]
  delta = _ln(z.mean(axis=1), p["ln_summary"]) @ p["delta"]["kernel"] + p["delta"]["bias"]
  delta *= np.linalg.norm(img_emb, axis=-1, keepdims=True) / np.linalg.norm(delta, axis=-1, keepdims=True)
  gate_in = np.concatenate([img_emb, _ln(concepts.mean(axis=1), p["ln_title"]), read_mass], axis=-1)
  gate = 1 / (1 + np.exp(-(gate_in @ p["gate"]["kernel"] + p["gate"]["bias"]))) * present[:, None]
  return np.where(present[:, None], img_emb + gate * delta, img_emb)


def test_concept_memory_matches_numpy_reference_and_ignores_padding():
  rng = np.random.default_rng(0)
  img_emb = rng.normal(size=(B, EMBED)).astype(np.float32)
  image_tokens = rng.normal(size=(B, 9, 20)).astype(np.float32)
  text_tokens = rng.normal(size=(B, L, 12)).astype(np.float32)
  lengths = np.array([0, 1, 3, 5, 7, 9, 11, 12])
  text_mask = np.arange(L)[None] < lengths[:, None]
  present = lengths > 2
  fusion = models.ConceptMemoryFusion(num_slots=SLOTS, num_heads=2)
  args = (img_emb, image_tokens, text_tokens, text_mask, present)
  variables = nn.meta.unbox(fusion.init(jax.random.key(0), *args))
  # Random (not initial) gate/null parameters so that every term of the formula matters.
  params = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), variables["params"])
  out = np.asarray(fusion.apply({"params": params}, *args))
  expected = _concept_memory_reference(jax.tree.map(np.asarray, params), *args)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  # Image-dominant by construction: the title term is at most as long as the image embedding.
  assert np.all(np.linalg.norm(out - img_emb, axis=-1) <= np.linalg.norm(img_emb, axis=-1) + 1e-5)
  # Whatever sits under the padding mask is never read.
  noisy = np.where(text_mask[..., None], text_tokens, 100.0 * rng.normal(size=text_tokens.shape))
  np.testing.assert_allclose(fusion.apply({"params": params}, img_emb, image_tokens, noisy.astype(np.float32),
                                          text_mask, present), out, atol=1e-5)


# == Sharded on the (4, 2) mesh ==================================================================
def test_concept_attention_sharded_matches_single_device():
  rules = (("batch", "data"), ("mlp", "model"), ("heads", "model"), ("vocab", "model"), ("concepts", "model"))
  model = _model()
  images, titles, is_query = _batch()
  mesh, variables = sharded_init.init_sharded(model, (images, titles, is_query), rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    memory = variables["params"]["doc_fusion"]["concept_memory"]
    assert memory["slots"].sharding.spec == P("model", None)
    assert memory["ground"]["query_kernel"].sharding.spec == P(None, "model", None)
    placed = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (images, titles, is_query)]
    sharded = jax.jit(model.apply)(variables, *placed)
    assert sharded.sharding.spec[0] == "data"
  single = jax.jit(model.apply)(jax.device_get(variables), images, titles, is_query)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
