"""Partial fine-tuning of the image tower on cached trunk maps (data.input='trunk_activations').

The tower splits into trunk and top exactly; blocks before model.image_trainable_from stay bitwise
put while the others train, at optimizer.pretrained_lr_scale times the learning rate; the cached
source is the same input as records when the views are the eval view; runs resume exactly; the
cache is reused while its key holds and recomputed when k or the views change.
"""
import copy
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from input_pipeline import images as images_lib
from oclear_jax import config_schema
from oclear_jax import run_data
from oclear_jax.train import pretrained_towers
from oclear_jax import sharding
from oclear_jax.train import batch_formats
from oclear_jax.train import input_sources
from oclear_jax.train import optimizer
from oclear_jax.train import trainer
from oclear_jax.models import efficientnet
from oclear_jax.weights import efficientnet_lite0
from oclear_jax.features import feature_cache
from oclear_jax.features import trunk_cache
import trained_state

SIZE = 64
K = 14  # blocks 14, 15 and the head conv train (the map at 64 px is 2x2x192)


def _records_task(task):
  """The same task reading records batches (raw images and title ids): the independent reference."""
  records = copy.copy(task)
  records.batch_format = batch_formats.RecordsFormat(task.config, task.model)
  return records


def _config(k=K, views=2, **optimizer):
  """tiny at 64 px on pretrained Lite0, image only, trained from block k on cached trunk maps."""
  config = tiny.get_config()
  config.data.synthetic.image_size = config.data.stored_image_size = SIZE
  config.data.train_preprocess = f"decode|random_resized_crop({SIZE})|flip_lr|value_range(-1, 1)"
  config.data.eval_preprocess = f"decode|resize({SIZE})|value_range(-1, 1)"
  m = config.model
  m.image_tower, m.image_pretrained, m.freeze_image_tower, m.fusion = "efficientnet_lite0", True, False, "image_only"
  m.image_trainable_from = k
  config.data.input, config.data.trunk_views = "trunk_activations", views
  config.train.update(dict(num_steps=4, checkpoint_every=2, log_every=2, async_checkpoints=False))
  config.eval.update(dict(at_start=False, scann=False, contact_sheet_queries=0))
  config.optimizer.update(dict(warmup_steps=0, **optimizer))
  return config


class _Setup:
  def __init__(self, config, workdir):
    config_schema.validate(config)
    self.config = config
    self.prepared = run_data.prepare_data(config.data, str(workdir), seed=config.seed, progress=False)
    self.task = trainer.OclearTask(config, sharding.make_mesh(config.mesh.shape),
                                   num_classes=self.prepared.num_classes, vocab_size=self.prepared.vocab_size,
                                   title_special_ids=self.prepared.title_special_ids)
    self.inputs = input_sources.make_input(config, self.prepared, self.place, str(workdir), progress=False)
    _, self.shardings = self.task.abstract_state()
    state = self.task.init_state(jax.random.key(0), self.shardings)
    self.state = pretrained_towers.load_pretrained_into_state(state, self.shardings, config.model)

  def place(self, batch):
    return sharding.global_batch(batch, self.task.mesh, self.task.rules)

  def loss(self, params, batch, task=None):
    task = task or self.task
    with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
      return float(jax.jit(task.loss_fn)(params, self.place(batch), jax.random.key(3))[0])

  def records_batch(self, rows):
    train = self.inputs.splits["train"]
    return dict(image=np.stack([images_lib.load_image(p, SIZE) for p in train.image_paths[rows]]),
                title_tokens=np.zeros((len(rows), self.config.data.max_title_len), np.int32),
                label=train.labels[rows], kind=train.kinds[rows])


def test_top_of_trunk_is_the_tower_bitwise():
  model = efficientnet.EfficientNetLite0()
  params = jax.tree.map(jnp.asarray, efficientnet_lite0.load_params())
  images = jax.random.uniform(jax.random.key(0), (2, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)
  tokens, pooled = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  for k in (0, 1, 6, 12, 15, 16):
    trunk = jax.jit(lambda p, x, k=k: model.apply({"params": p}, x, k, method="trunk"))(params, images)
    assert trunk.shape[1:] == efficientnet.trunk_shape(SIZE, k)
    top_tokens, top_pooled = jax.jit(lambda p, a, k=k: model.apply({"params": p}, a, k, method="top"))(params, trunk)
    np.testing.assert_array_equal(top_tokens, tokens)
    np.testing.assert_array_equal(top_pooled, pooled)
  assert efficientnet.trunk_shape(224, 12) == (7, 7, 192) and efficientnet.trunk_shape(224, 16) == (7, 7, 320)
  with pytest.raises(ValueError, match="image_trainable_from=17"):
    efficientnet.trunk_shape(224, 17)


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_blocks_before_k_stay_put_on_records_and_the_rest_trains(tmp_path):
  """The records path honours image_trainable_from: stem and blocks < k bitwise unchanged, no moments."""
  config = _config(weight_decay=0.1)  # large, so that a decayed frozen weight would show
  config.data.input = "records"
  setup = _Setup(config, tmp_path)
  before = jax.device_get(setup.state["params"]["encoder"]["image_encoder"])
  mu = setup.state["opt_state"][1][0].mu["encoder"]["image_encoder"]  # chain(clip, adamw): adam's moments
  assert sorted(mu) == ["block14", "block15", "head"]
  step = setup.task.jit_train_step(setup.shardings)
  rng = np.random.default_rng(0)
  batch = dict(image=rng.uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32),
               title_tokens=np.zeros((16, config.data.max_title_len), np.int32),
               label=rng.integers(0, setup.prepared.num_classes, 16).astype(np.int32),
               kind=(np.arange(16) % 2).astype(np.int32))
  state, metrics = step(setup.state, setup.place(batch), jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state["params"]["encoder"]["image_encoder"])
  for name in before:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
    trained = name == "head" or (name.startswith("block") and int(name[5:]) >= K)
    assert same != trained, name


def test_pretrained_lr_scale_scales_the_towers_first_adam_update(tmp_path):
  setup = _Setup(_config(), tmp_path)
  batch = setup.place(setup.inputs._split_batch("train", np.arange(16)))  # pylint: disable=protected-access
  params = setup.state["params"]
  with jax.set_mesh(setup.task.mesh), nn.logical_axis_rules(setup.task.rules):
    grads = jax.jit(jax.grad(lambda p: setup.task.loss_fn(p, batch, jax.random.key(3))[0]))(params)
  updates = {}
  for scale in (1.0, 0.5, 0.0):  # 0: the pretrained layers held still
    config = _config(pretrained_lr_scale=scale)
    tx = pretrained_towers.tower_optimizer(optimizer.make_optimizer(config.optimizer, 4), config)
    updates[scale] = _leaves(jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])(grads, params))
  for path, full in updates[1.0].items():
    if "'image_encoder'" not in path:  # class centres: the full rate either way
      np.testing.assert_array_equal(updates[0.5][path], full, err_msg=path)
      np.testing.assert_array_equal(updates[0.0][path], full, err_msg=path)
    elif "'stem'" in path or "'block0'" in path:  # frozen: no update at any scale
      assert not full.any() and not updates[0.5][path].any(), path
    elif "'head'" in path:
      assert np.abs(full).max() > 0, path
      np.testing.assert_allclose(updates[0.5][path], 0.5 * full, rtol=1e-6, atol=1e-12, err_msg=path)
      assert not updates[0.0][path].any(), path


def test_trunk_loss_equals_the_records_loss_of_the_same_state(tmp_path):
  """The independent reference: the same model through raw images, eval preprocessing."""
  setup = _Setup(_config(), tmp_path)
  rows = np.arange(16)
  params = setup.state["params"]
  from_records = setup.loss(params, setup.records_batch(rows), _records_task(setup.task))
  cached = setup.inputs._split_batch("train", rows)  # pylint: disable=protected-access  (view 0)
  # The trunk in float32 (no storage rounding): the same numbers as the records path.
  model = efficientnet.EfficientNetLite0()
  trunk = jax.jit(lambda p, x: model.apply({"params": p}, x, K, method="trunk"))(
      params["encoder"]["image_encoder"], setup.records_batch(rows)["image"])
  np.testing.assert_allclose(np.asarray(cached["trunk"], np.float32), trunk, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(setup.loss(params, {**cached, "trunk": np.asarray(trunk)}), from_records, rtol=1e-6)
  # The float16 cache: equal up to its rounding.
  np.testing.assert_allclose(setup.loss(params, cached), from_records, rtol=2e-3)


def test_views_differ_and_are_drawn_per_step():
  views = [input_sources.trunk_views(0, step, 64, 2) for step in (1, 2)]
  assert set(views[0]) == {0, 1} and not np.array_equal(*views)
  np.testing.assert_array_equal(input_sources.trunk_views(0, 2, 64, 2), views[1])


def test_trunk_training_resumes_exactly(tmp_path):
  config = _config()
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
  broken = str(tmp_path / "broken")
  assert trainer.train_and_evaluate(config, broken, progress=False, stop_at_step=2)["final_step"] == 2
  resumed = trainer.train_and_evaluate(config, broken, progress=False)
  states = [jax.device_get(trained_state.restore_trained_state(config, w)[1])
            for w in (str(tmp_path / "straight"), broken)]
  assert int(states[0]["step"]) == int(states[1]["step"]) == 4
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)
  assert straight["eval"][4] == resumed["eval"][4]
  start = efficientnet_lite0.load_params()  # what the fresh run loaded
  trained = states[0]["params"]["encoder"]["image_encoder"]
  assert np.array_equal(start["block3"]["expand"]["kernel"], trained["block3"]["expand"]["kernel"])
  assert not np.array_equal(start["block15"]["project"]["kernel"], trained["block15"]["project"]["kernel"])


def test_cache_hits_and_misses(tmp_path):
  config = _config()
  prepared = run_data.prepare_data(config.data, str(tmp_path / "run"), seed=0, progress=False)
  from oclear_jax.features import tower_features  # pylint: disable=g-import-not-at-top
  paths = sorted({r.image_path for r in tower_features.catalogue_rows(config, prepared)})[:5]
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"not an image")
  paths.append(str(broken))
  kwargs = dict(image_size=SIZE, cache_dir=str(tmp_path / "cache"), progress=False)
  first = trunk_cache.trunk_activations(paths, 2, trainable_from=12, **kwargs)
  assert first.computed and first.activations.dtype == np.float16
  assert first.activations.shape == (12, *efficientnet.trunk_shape(SIZE, 12))
  again = trunk_cache.trunk_activations(paths, 2, trainable_from=12, **kwargs)
  assert not again.computed and again.directory == first.directory
  np.testing.assert_array_equal(again.activations, first.activations)
  assert trunk_cache.trunk_activations(paths, 2, trainable_from=13, **kwargs).computed  # another k
  assert trunk_cache.trunk_activations(paths, 3, trainable_from=12, **kwargs).computed  # another V
  # The unreadable file: counted, both its views not ok and zero; the others fine.
  bad = first.rows([str(broken)] * 2, np.array([0, 1]))
  assert not first.ok[bad].any() and not np.asarray(first.activations[bad]).any()
  assert len(first.failures) == 1 and str(broken) in first.failures[0]
  good = first.rows(paths[:5], 0)
  assert first.ok[good].all()
  # View 0 is the eval preprocessing's trunk; view 1 a reproducible crop and flip, not view 0.
  model = efficientnet.EfficientNetLite0()
  params = jax.tree.map(jnp.asarray, efficientnet_lite0.load_params())
  images = np.stack([images_lib.load_image(p, SIZE) for p in paths[:5]])
  want = model.apply({"params": params}, images, 12, method="trunk")
  # (another batch size: float32 sums may round to a neighbouring float16 now and then)
  np.testing.assert_allclose(np.asarray(first.activations[good], np.float32), want, rtol=1e-3, atol=1e-3)
  assert not np.array_equal(first.activations[first.rows(paths[:5], 1)], first.activations[good])
  views = [trunk_cache.load_views(paths[0], SIZE, [0, 1, 2]) for _ in range(2)]
  for a, b in zip(*views):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(views[0][0], images_lib.load_image(paths[0], SIZE))
  assert not any(name.endswith(".tmp-" + str(os.getpid())) for name in os.listdir(tmp_path / "cache"))


@pytest.mark.parametrize("change, message", [
    (dict(image_trainable_from=17), r"model.image_trainable_from=17"),
    (dict(image_trainable_from=0), r"data.input='trunk_activations' .* image_trainable_from"),
    (dict(freeze_image_tower=True), r"freeze_image_tower=True"),
    (dict(image_tower="vit", image_pretrained=False), r"image_tower='vit'"),
])
def test_validate_names_the_key(change, message):
  config = _config()
  config.model.update(change)
  with pytest.raises(ValueError, match=message):
    config_schema.validate(config)
  config = _config(pretrained_lr_scale=-0.1)
  with pytest.raises(ValueError, match="optimizer.pretrained_lr_scale=-0.1"):
    config_schema.validate(config)
