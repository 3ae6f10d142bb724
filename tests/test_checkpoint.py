"""Checkpoints restore onto a mesh of another shape with identical values, and refuse other models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import sharding


def _state(mesh):
  centers = jnp.arange(40 * 6, dtype=jnp.float32).reshape(40, 6) / 7.0
  return {"step": jnp.int32(5),
          "params": {"class_centers": jax.device_put(centers, NamedSharding(mesh, P(("data", "model"), None))),
                     "bias": jax.device_put(jnp.linspace(0, 1, 6), NamedSharding(mesh, P()))}}


def _target(mesh, spec_classes):
  specs = {"step": P(), "params": {"class_centers": spec_classes, "bias": P()}}
  abstract = jax.eval_shape(lambda: _state(sharding.make_mesh((8, 1))))
  return checkpoint_lib.abstract_with_shardings(abstract, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def test_restore_onto_other_mesh_shapes_is_exact(tmp_path):
  saved = _state(sharding.make_mesh((8, 1)))
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", async_save=False)
  store.save(5, saved)
  store.close()
  four = sharding.make_mesh((2, 2), devices=jax.devices()[:4])
  for mesh, spec in ((four, P("model", None)), (sharding.make_mesh((2, 4)), P(("data", "model"), None))):
    restored, step = checkpoint_lib.CheckpointStore(tmp_path / "ckpt").restore(_target(mesh, spec))
    assert step == 5
    assert restored["params"]["class_centers"].sharding.mesh.shape == mesh.shape
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, saved)


def test_other_model_is_refused_naming_the_array(tmp_path):
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", async_save=False)
  store.save(1, _state(sharding.make_mesh((8, 1))))
  store.close()
  target = _target(sharding.make_mesh((8, 1)), P())
  target["params"]["class_centers"] = jax.ShapeDtypeStruct((41, 6), jnp.float32)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="class_centers has shape"):
    checkpoint_lib.CheckpointStore(tmp_path / "ckpt").restore(target)


def test_torn_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path):
  mesh = sharding.make_mesh((8, 1))
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", async_save=False)
  first = _state(mesh)
  store.save(1, first)
  second = jax.tree.map(lambda x: x + 1, first)
  store.save(2, second)
  store.close()
  # Cut every data file of step 2 in half, as a disk filling up mid-write would.
  data_files = [p for p in (tmp_path / "ckpt" / "2").rglob("*") if p.is_file() and p.stat().st_size > 64]
  assert data_files
  for path in data_files:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt")
  restored, step = store.restore(_target(mesh, P(("data", "model"), None)))
  assert step == 1 and [s for s, _ in store.broken] == [2]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, first)
  assert (tmp_path / "ckpt.broken" / "2").is_dir() and not (tmp_path / "ckpt" / "2").exists()
  store.save(2, second)  # the run goes on and writes step 2 afresh
  store.close()
  assert checkpoint_lib.CheckpointStore(tmp_path / "ckpt").restore(_target(mesh, P("data", None)))[1] == 2


def test_state_saved_on_four_devices_restores_onto_eight(tmp_path):
  four = sharding.make_mesh((2, 2), devices=jax.devices()[:4])
  saved = _state(four)
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", async_save=False)
  store.save(5, saved)
  store.close()
  restored, _ = checkpoint_lib.CheckpointStore(tmp_path / "ckpt").restore(
      _target(sharding.make_mesh((1, 8)), P(("data", "model"), None)))
  assert len(restored["params"]["class_centers"].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, saved)


def test_params_only_restore_skips_a_torn_step_in_place_and_equals_the_full_restore(tmp_path, capsys):
  mesh = sharding.make_mesh((8, 1))
  encoder = {"kernel": jax.device_put(jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6), NamedSharding(mesh, P()))}
  first = {**_state(mesh), "params": {**_state(mesh)["params"], "encoder": encoder}}
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", async_save=False)
  store.save(1, first)
  store.save(2, jax.tree.map(lambda x: x + 1, first))
  store.close()
  for path in [p for p in (tmp_path / "ckpt" / "2").rglob("*") if p.is_file() and p.stat().st_size > 64]:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  target = checkpoint_lib.abstract_with_shardings(jax.eval_shape(lambda: encoder), {"kernel": NamedSharding(mesh, P())})
  params, step = checkpoint_lib.restore_model_params(str(tmp_path / "ckpt"), target)
  assert step == 1 and jax.tree.structure(params) == jax.tree.structure(encoder)
  assert "checkpoint step 2" in capsys.readouterr().err
  # A reader moves nothing: the torn step stays for the training run that owns the directory.
  assert (tmp_path / "ckpt" / "2").is_dir() and not (tmp_path / "ckpt.broken").exists()
  full_target = checkpoint_lib.abstract_with_shardings(
      jax.eval_shape(lambda: first), jax.tree.map(lambda a: a.sharding, first))
  full, full_step = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", read_only=True).restore(full_target)
  assert full_step == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params,
               full["params"]["encoder"])
  np.testing.assert_array_equal(np.asarray(params["kernel"]), np.asarray(encoder["kernel"]))
