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
