"""Per-backend tower options: conv implementation, compute dtype, remat (models/accelerator.py).

What must hold: the CPU convolution tricks and XLA's convolutions compute the same tower from the
same parameters (pretrained weights load into either); remat changes no gradient; bfloat16
compute keeps float32 parameters and float32 outputs close to the float32 ones; 'auto' resolves
by backend; the config keys are `ModelConfig` fields that every tower builder passes to its tower
(`models.build_model`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oclear_jax import config_schema
from oclear_jax import models
from oclear_jax.models import accelerator
from oclear_jax.models import bert
from oclear_jax.models import efficientnet
from oclear_jax.models import text
from oclear_jax.models import vit
from oclear_jax.weights import efficientnet_lite0

RNG = np.random.default_rng(0)
IMAGES = jnp.asarray(RNG.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
IDS = jnp.asarray(RNG.integers(1, 50, (2, 8)), jnp.int32).at[:, 6:].set(0)


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def _loss_and_grads(model, params, x, **kwargs):
  def loss(p):
    tokens, pooled = model.apply({"params": p}, x, **kwargs)[:2]
    return jnp.sum(jnp.sin(tokens)) + jnp.sum(pooled ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


# == Convolutions: CPU tricks vs XLA ===========================================================
def test_conv_impls_share_parameters_and_outputs():
  tricks = efficientnet.EfficientNetLite0(num_classes=1000, conv_impl="cpu_tricks")
  lax_convs = efficientnet.EfficientNetLite0(num_classes=1000, conv_impl="xla")
  assert _shapes(jax.eval_shape(tricks.init, jax.random.key(0), IMAGES)) == _shapes(
      jax.eval_shape(lax_convs.init, jax.random.key(0), IMAGES))
  params = efficientnet_lite0.load_params(include_classifier=True)  # the ImageNet weights load into both
  images = jnp.asarray(RNG.uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)  # odd map sizes: 32, 16, 8, 4, 2
  a = jax.jit(tricks.apply)({"params": params}, images)
  b = jax.jit(lax_convs.apply)({"params": params}, images)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-4)


def test_xla_conv_matches_tricks_on_odd_sizes():
  """Values and gradients (w.r.t. input and kernel) of both implementations, SAME padding on odd sides."""
  x = jnp.asarray(RNG.normal(size=(2, 7, 9, 6)), jnp.float32)
  for k, stride in ((3, 1), (3, 2), (5, 2)):
    for depthwise, shape, tricks in ((True, (k, k, 1, 6), efficientnet.depthwise_conv),
                                     (False, (k, k, 6, 4), efficientnet.conv2d)):
      kernel = jnp.asarray(RNG.normal(size=shape), jnp.float32)
      lax_conv = lambda x, w: efficientnet.xla_conv(x, w, stride, depthwise=depthwise)
      trick = lambda x, w: tricks(x, w, stride)
      np.testing.assert_allclose(lax_conv(x, kernel), trick(x, kernel), rtol=1e-5, atol=1e-5)
      grads = [jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, kernel) for f in (lax_conv, trick)]
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)


def test_auto_resolves_by_backend():
  assert accelerator.conv_impl("auto", backend="cpu") == "cpu_tricks"
  assert accelerator.conv_impl("auto", backend="gpu") == accelerator.conv_impl("auto", backend="tpu") == "xla"
  assert accelerator.conv_impl("xla", backend="cpu") == "xla"
  assert accelerator.compute_dtype("auto", backend="cpu") == jnp.float32
  assert accelerator.compute_dtype("auto", backend="gpu") == accelerator.compute_dtype("auto", "tpu") == jnp.bfloat16
  assert accelerator.compute_dtype("float32", backend="tpu") == jnp.float32
  for bad in (lambda: accelerator.compute_dtype("fp16"), lambda: accelerator.conv_impl("cudnn"),
              lambda: accelerator.check_remat("all")):
    with pytest.raises(ValueError, match="config.model"):
      bad()


# == Remat: the same gradients ==================================================================
TOWERS = {
    "vit": (lambda **o: vit.ViTEncoder(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, dropout=0.1, **o),
            IMAGES),
    "text": (lambda **o: text.TextEncoder(vocab_size=50, max_len=8, width=32, depth=2, num_heads=2, mlp_dim=64,
                                          dropout=0.1, **o), IDS),
    "bert": (lambda **o: bert.BertEncoder(bert.BertSizes(50, 32, 2, 2, 64, 8), dropout=0.1, **o), IDS),
}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_remat_gives_the_same_gradients(name):
  make, x = TOWERS[name]
  plain, remat = make(), make(remat="blocks")
  params = jax.jit(plain.init)(jax.random.key(1), x)["params"]
  assert _shapes(params) == _shapes(jax.eval_shape(remat.init, jax.random.key(1), x)["params"])
  rngs = {"dropout": jax.random.key(2)}  # train=True: dropout inside the rematerialised blocks
  loss_a, grads_a = _loss_and_grads(plain, params, x, train=True, rngs=rngs)
  loss_b, grads_b = _loss_and_grads(remat, params, x, train=True, rngs=rngs)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads_a, grads_b)


def test_remat_efficientnet_blocks():
  """On the tower's top from block 14 (blocks 14-15 and the head conv): the same MBConv code, cheaper to compile."""
  plain, remat = efficientnet.EfficientNetLite0(), efficientnet.EfficientNetLite0(remat="blocks")
  trunk = jnp.asarray(RNG.uniform(0, 6, (2, *efficientnet.trunk_shape(32, 14))), jnp.float32)
  params = jax.jit(lambda k: plain.init(k, trunk, 14, method="top"))(jax.random.key(1))["params"]

  def grads(model):
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, trunk, 14, method="top")[0]))
    return jax.jit(jax.grad(loss))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads(plain), grads(remat))


# == Compute dtype ==============================================================================
@pytest.mark.parametrize("name", sorted(TOWERS))
def test_bfloat16_compute_keeps_float32_parameters_and_outputs(name):
  make, x = TOWERS[name]
  f32, bf16 = make(), make(dtype=jnp.bfloat16)
  params = jax.jit(bf16.init)(jax.random.key(1), x)["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  out32, out16 = jax.jit(f32.apply)({"params": params}, x), jax.jit(bf16.apply)({"params": params}, x)
  for a, b in zip(out32[:2], out16[:2]):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.1)
  hlo = jax.jit(bf16.apply).lower({"params": params}, x).as_text()
  assert "bf16" in hlo and "dot_general" in hlo


def test_bfloat16_efficientnet():
  f32, bf16 = efficientnet.EfficientNetLite0(), efficientnet.EfficientNetLite0(dtype=jnp.bfloat16, conv_impl="xla")
  params = efficientnet_lite0.load_params()  # real weights: cheaper than initialising Lite0, and realistic
  (tokens32, pooled32), (tokens16, pooled16) = (jax.jit(m.apply)({"params": params}, IMAGES) for m in (f32, bf16))
  assert tokens16.dtype == pooled16.dtype == jnp.float32
  cosine = jnp.sum(pooled32 * pooled16, -1) / jnp.linalg.norm(pooled32, axis=-1) / jnp.linalg.norm(pooled16, axis=-1)
  assert float(cosine.min()) > 0.99, cosine


# == Config keys reach the towers ===============================================================
def _model(**model_keys):
  c = config_schema.base_config()
  c.model.vit = "nano"
  c.model.update(model_keys)
  return models.build_model(c.model, vocab_size=50, max_title_len=8)


def test_config_keys_reach_the_towers():
  default = _model()  # 'auto' on CPU: float32, no remat (bitwise the model of before these keys)
  assert default.image_encoder.dtype == default.text_encoder.dtype == jnp.float32
  assert default.image_encoder.remat == default.text_encoder.remat == "none"
  fast = _model(dtype="bfloat16", remat="blocks")
  assert fast.image_encoder.dtype == fast.text_encoder.dtype == jnp.bfloat16
  assert fast.image_encoder.remat == fast.text_encoder.remat == "blocks"
  lite0 = _model(image_tower="efficientnet_lite0", fusion="image_only", embed_dim=16, conv_impl="xla")
  assert lite0.image_encoder.conv_impl == "xla" and lite0.text_encoder is None
  with pytest.raises(ValueError, match="config.model.remat"):
    _model(remat="everything")
  inputs = (IMAGES[:, :16, :16], IDS, jnp.array([True, False]))
  params = jax.jit(fast.init)(jax.random.key(0), *inputs)["params"]
  assert _shapes(params) == _shapes(jax.eval_shape(default.init, jax.random.key(0), *inputs)["params"])
  embeddings = jax.jit(fast.apply)({"params": params}, *inputs)
  assert embeddings.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)


def test_options_are_model_config_fields_that_every_builder_must_pass(monkeypatch):
  config = models.ModelConfig.from_config(dict(dtype="bfloat16", remat="blocks", conv_impl="xla"))
  assert (config.dtype, config.remat, config.conv_impl) == ("bfloat16", "blocks", "xla")
  assert config.compute_dtype == jnp.bfloat16 and models.ModelConfig().compute_dtype == jnp.float32  # CPU: 'auto'
  with pytest.raises(ValueError, match="config.model.dtype"):
    models.ModelConfig(dtype="fp16")
  # A registered builder that drops the options, and a tower that has none of them.
  monkeypatch.setitem(models.IMAGE_TOWERS, "forgetful", lambda c: vit.ViTEncoder(patch_size=8, **vit.vit_sizes("nano")))
  monkeypatch.setitem(models.IMAGE_TOWERS, "optionless", lambda c: models.ProjectionHead(8, 8))
  with pytest.raises(ValueError, match="config.model.remat asks for 'blocks' but the ViTEncoder tower's builder"):
    _model(image_tower="forgetful", remat="blocks")
  assert _model(image_tower="forgetful").image_encoder.remat == "none"  # what the config asks anyway
  with pytest.raises(ValueError, match="config.model.dtype='bfloat16' but the ProjectionHead tower computes in"):
    _model(image_tower="optionless", dtype="bfloat16")
  assert isinstance(_model(image_tower="optionless", dtype="float32").image_encoder, models.ProjectionHead)
