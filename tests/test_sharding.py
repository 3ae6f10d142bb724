"""Mesh from config, logical rules, batch placement and the replication guard."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oclear_jax import sharding


def test_mesh_shape_fills_minus_one_and_rejects_mismatch():
  assert dict(sharding.make_mesh((-1, 2)).shape) == {"data": 4, "model": 2}
  with pytest.raises(ValueError, match=r"needs 6 devices but 8 exist"):
    sharding.make_mesh((3, 2))
  with pytest.raises(ValueError, match="not a multiple of 3"):
    sharding.make_mesh((-1, 3))


def test_rules_name_unknown_mesh_axes():
  rules = sharding.logical_rules([("batch", ("data", "model")), ("classes", "model"), ("embed", None)])
  assert sharding.mesh_axes("batch", rules) == ("data", "model")
  assert sharding.mesh_axes("classes", rules) == ("model",)
  assert sharding.mesh_axes("embed", rules) == () and sharding.mesh_axes("mlp", rules) == ()
  with pytest.raises(ValueError, match="unknown mesh axis 'modle'"):
    sharding.logical_rules([("classes", "modle")])


def test_global_batch_is_split_along_batch_axes():
  mesh = sharding.make_mesh((4, 2))
  rules = sharding.logical_rules([("batch", ("data", "model"))])
  local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16, dtype=np.int32)}
  batch = sharding.global_batch(local, mesh, rules)
  assert batch["image"].sharding.spec == P(("data", "model"), None)
  assert {s.data.shape for s in batch["label"].addressable_shards} == {(2,)}
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def test_replicated_large_array_is_refused_by_name():
  mesh = sharding.make_mesh((4, 2))
  abstract = {"params": {"class_centers": jax.ShapeDtypeStruct((1000, 64), np.float32),
                         "bias": jax.ShapeDtypeStruct((64,), np.float32)}}
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
  with pytest.raises(ValueError, match="params/class_centers"):
    sharding.check_sufficiently_sharded(abstract, replicated, max_replicated_bytes=100_000)
  sharded = {"params": {"class_centers": NamedSharding(mesh, P(("data", "model"), None)),
                        "bias": NamedSharding(mesh, P())}}
  sharding.check_sufficiently_sharded(abstract, sharded, max_replicated_bytes=100_000)
