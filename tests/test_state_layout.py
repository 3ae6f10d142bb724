"""Golden partition specs of the whole train state (MaxText's habit) and the layouts rules select.

A change that moves any state array to another layout (a renamed logical axis, a forgotten rule,
a new parameter) fails here and must be looked at. After an intended change, regenerate with

  OCLEAR_UPDATE_GOLDEN=1 python -m pytest tests/test_state_layout.py
"""
import json
import os

import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from oclear_jax import sharding
from oclear_jax.train import trainer

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_train_state_specs.json")
NUM_CLASSES, VOCAB = 37, 300


def _specs(config):
  mesh = sharding.make_mesh(config.mesh.shape)
  task = trainer.OclearTask(config, mesh, num_classes=NUM_CLASSES, vocab_size=VOCAB)
  abstract, shardings = task.abstract_state()
  specs = {jax.tree_util.keystr(path): str(s.spec)
           for path, s in jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: hasattr(x, "spec"))
}
  shapes = {jax.tree_util.keystr(path): (tuple(x.shape), str(x.dtype))
            for path, x in jax.tree_util.tree_leaves_with_path(abstract)}
  return specs, shapes


def test_train_state_layout_matches_golden():
  specs, _ = _specs(tiny.get_config())
  if os.environ.get("OCLEAR_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w", encoding="utf-8") as f:
      json.dump(specs, f, indent=1, sort_keys=True)
  with open(GOLDEN, encoding="utf-8") as f:
    golden = json.load(f)
  assert sorted(specs) == sorted(golden), sorted(set(specs) ^ set(golden))
  changed = {k: (golden[k], specs[k]) for k in specs if specs[k] != golden[k]}
  assert not changed, changed


def test_only_class_centres_and_their_moments_are_sharded_by_default():
  specs, shapes = _specs(tiny.get_config())
  sharded = {k for k, v in specs.items() if "'" in v}  # names a mesh axis
  assert sharded and all("class_centers" in k for k in sharded), sharded
  # Params, Adam mu and nu: each [C_pad, embed] split by class over both mesh axes.
  assert len(sharded) == 3
  for k in sharded:
    assert specs[k] == str(P(("data", "model"), None)), (k, specs[k])
    assert shapes[k][0][0] % 8 == 0 and shapes[k][0][0] >= NUM_CLASSES


def test_rules_move_classes_to_model_and_backbone_to_fsdp():
  config = tiny.get_config()
  config.sharding.rules = (("batch", ("data", "model")), ("classes", "model"), ("mlp", "data"))
  specs, _ = _specs(config)
  assert specs["['params']['class_centers']"] == str(P("model", None))
  fsdp = {k: v for k, v in specs.items() if "'data'" in v}
  # Every MLP kernel of the backbone (and its moments) is now split over 'data'.
  assert fsdp and all("encoder" in k for k in fsdp)
  assert any("image_encoder" in k for k in fsdp)


def test_bf16_centres_store_bf16_moments():
  config = tiny.get_config()
  config.head.param_dtype = "bfloat16"
  _, shapes = _specs(config)
  centre_dtypes = {v[1] for k, v in shapes.items() if "class_centers" in k}
  assert centre_dtypes == {"bfloat16"}
  assert shapes["['params']['encoder']['query_head']['fc1']['kernel']"][1] == "float32"


def test_replicated_large_array_is_refused_by_name():
  config = tiny.get_config()
  config.sharding.rules = (("batch", ("data", "model")),)  # classes left replicated
  config.sharding.max_replicated_mib = 0.001
  mesh = sharding.make_mesh(config.mesh.shape)
  task = trainer.OclearTask(config, mesh, num_classes=NUM_CLASSES, vocab_size=VOCAB)
  abstract, shardings = task.abstract_state()
  with pytest.raises(ValueError, match="class_centers"):
    sharding.check_sufficiently_sharded(abstract, shardings, int(config.sharding.max_replicated_mib * 2**20))
