"""Sharded margin softmax vs an independent dense single-device reference."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oclear_jax import heads

NUM_CLASSES = 37  # Not a multiple of 8: exercises padding.
BATCH, DIM = 16, 12
SCALE = 32.0
AXES = ("data", "model")
BOTH = ("data", "model")
MARGINS = {
    "cosface": dict(scale=SCALE, margin=0.35),
    "arcface": dict(scale=SCALE, margin=0.5),
}


def _mesh(shape):
  return jax.make_mesh(shape, AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _inputs(c_pad, seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  emb = jax.random.normal(k1, (BATCH, DIM), jnp.float32) * 3.0
  centers = jax.random.normal(k2, (c_pad, DIM), jnp.float32)
  labels = jax.random.randint(k3, (BATCH,), 0, NUM_CLASSES, jnp.int32)
  weights = jax.random.uniform(k4, (BATCH,), jnp.float32, 0.1, 2.0)
  return emb, labels, centers, weights


def _ref_margin(cos, onehot, name, scale, margin):
  """Elementwise margin written independently of oclear_jax.heads.margins."""
  if name == "cosface":
    tgt = cos - margin
  else:
    theta = jnp.arccos(jnp.clip(cos, -1 + 1e-7, 1 - 1e-7))
    tgt = jnp.where(theta + margin > math.pi, cos - margin * math.sin(margin),
                    jnp.cos(theta + margin))
  return scale * jnp.where(onehot, tgt, cos)


def _reference(emb, labels, centers, weights, name):
  e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
  c = centers[:NUM_CLASSES]
  c = c / jnp.linalg.norm(c, axis=1, keepdims=True)
  cos = e @ c.T
  onehot = jax.nn.one_hot(labels, NUM_CLASSES, dtype=bool)
  logp = jax.nn.log_softmax(_ref_margin(cos, onehot, name, **MARGINS[name]))
  per_row = -jnp.sum(jnp.where(onehot, logp, 0.0), axis=1)
  w = jnp.ones_like(per_row) if weights is None else weights
  return jnp.sum(w * per_row) / jnp.sum(w)


def _sharded_fn(mesh, batch_axes, class_axes, name, chunk_size=None):
  def f(emb, labels, centers, weights):
    return heads.margin_softmax_loss(
        emb, labels, centers, num_classes=NUM_CLASSES,
        margin_fn=heads.make_margin(name, **MARGINS[name]), mesh=mesh,
        batch_axes=batch_axes, class_axes=class_axes, weights=weights,
        chunk_size=chunk_size)
  return f


def _place(mesh, batch_axes, class_axes, emb, labels, centers, weights):
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  b = batch_axes or None
  return (put(emb, P(b, None)), put(labels, P(b)),
          put(centers, P(class_axes or None, None)),
          None if weights is None else put(weights, P(b)))


def _assert_close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=rtol,
                             atol=rtol * float(np.abs(b).max()))


CONFIGS = [((8, 1), BOTH, BOTH), ((4, 2), BOTH, BOTH), ((2, 4), BOTH, BOTH),
           ((1, 8), BOTH, BOTH), ((2, 4), ("data",), ("model",))]


# chunk=2: 3 chunks per shard on 8 shards (C_pad=48, whole-padding chunks), 5
# on 4 shards.
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("name", ["cosface", "arcface"])
@pytest.mark.parametrize("shape,batch_axes,class_axes", CONFIGS)
def test_matches_dense_reference(shape, batch_axes, class_axes, name, chunk):
  mesh = _mesh(shape)
  n_shards = heads.num_class_shards(mesh, class_axes)
  c_pad = heads.pad_num_classes(NUM_CLASSES, n_shards, chunk_size=chunk)
  emb, labels, centers, _ = _inputs(c_pad)
  grad_ref = jax.jit(jax.value_and_grad(
      lambda e, c: _reference(e, labels, c, None, name), argnums=(0, 1)))
  loss_ref, (ge_ref, gc_ref) = grad_ref(emb, centers)

  f = _sharded_fn(mesh, batch_axes, class_axes, name, chunk)
  args = _place(mesh, batch_axes, class_axes, emb, labels, centers, None)
  vg = jax.jit(jax.value_and_grad(
      lambda e, c: f(e, args[1], c, None), argnums=(0, 1), has_aux=True))
  (loss, _), (ge, gc) = vg(args[0], args[2])
  _assert_close(loss, loss_ref)
  _assert_close(ge, ge_ref)
  _assert_close(gc, gc_ref)
  assert np.all(np.asarray(gc)[NUM_CLASSES:] == 0)  # Padding gets no grad.


@pytest.mark.parametrize("shape,batch_axes,class_axes",
                         [((2, 4), BOTH, BOTH), ((2, 4), ("data",), ()),
                          ((2, 4), (), ("model",))])
def test_weights_accuracy_and_degenerate_axes(shape, batch_axes, class_axes):
  mesh = _mesh(shape)
  c_pad = heads.pad_num_classes(
      NUM_CLASSES, heads.num_class_shards(mesh, class_axes))
  emb, labels, centers, weights = _inputs(c_pad, seed=1)
  # Make about half the rows correct so accuracy is informative.
  emb = emb.at[::2].set(centers[labels[::2]] * 5.0)
  f = jax.jit(_sharded_fn(mesh, batch_axes, class_axes, "arcface"))
  loss, aux = f(*_place(mesh, batch_axes, class_axes, emb, labels, centers,
                        weights))
  _assert_close(loss, _reference(emb, labels, centers, weights, "arcface"))
  c = centers[:NUM_CLASSES]
  cos = (emb / jnp.linalg.norm(emb, axis=1, keepdims=True)) @ (
      c / jnp.linalg.norm(c, axis=1, keepdims=True)).T
  acc_ref = float(jnp.mean(jnp.argmax(cos, axis=1) == labels))
  assert 0.0 < acc_ref < 1.0
  np.testing.assert_allclose(float(aux["accuracy"]), acc_ref)


def test_padding_rows_never_win():
  mesh = _mesh((2, 4))
  emb, labels, centers, _ = _inputs(40)
  f = jax.jit(_sharded_fn(mesh, BOTH, BOTH, "cosface"))
  loss, aux = f(*_place(mesh, BOTH, BOTH, emb, labels, centers, None))
  # Padded rows aligned with every embedding would win any unmasked softmax.
  poisoned = centers.at[NUM_CLASSES:].set(1e6 * emb[:3].sum(0))
  loss2, aux2 = f(*_place(mesh, BOTH, BOTH, emb, labels, poisoned, None))
  assert float(loss2) == float(loss)
  assert float(aux2["accuracy"]) == float(aux["accuracy"])


def test_margin_values():
  cos = jnp.array([[0.5, 0.2], [-0.99, 0.3]])
  mask = jnp.array([[True, False], [True, False]])
  out = heads.arcface(cos, mask, scale=64.0, margin=0.5)
  np.testing.assert_allclose(out[0, 0], 64 * math.cos(math.acos(0.5) + 0.5),
                             rtol=1e-5)
  # theta + m > pi: insightface's linear fallback cos - m * sin(m).
  np.testing.assert_allclose(out[1, 0], 64 * (-0.99 - 0.5 * math.sin(0.5)),
                             rtol=1e-5)
  np.testing.assert_allclose(out[:, 1], 64 * cos[:, 1], rtol=1e-5)
  out = heads.cosface(cos, mask, scale=30.0, margin=0.35)
  np.testing.assert_allclose(out[:, 0], 30 * (cos[:, 0] - 0.35), rtol=1e-5)
  np.testing.assert_allclose(out[:, 1], 30 * cos[:, 1], rtol=1e-5)
  comb = heads.make_margin("combined", scale=10.0, m1=1.0, m2=0.3, m3=0.2)
  np.testing.assert_allclose(
      comb(cos, mask)[0, 0], 10 * (math.cos(math.acos(0.5) + 0.3) - 0.2),
      rtol=1e-5)


def test_make_margin_errors():
  with pytest.raises(ValueError, match=r"'cosfce'.*arcface, combined, cosface"):
    heads.make_margin("cosfce")
  with pytest.raises(TypeError, match="arcface"):
    heads.make_margin("arcface", m2=0.5)


def test_padding_cuts_shards_into_equal_chunks():
  # 10^6 classes, 8 shards of 125,000 -> 16 chunks of 7,813 (not 8,192): 64 padding rows, not 48,576.
  assert heads.pad_num_classes(1_000_000, 8, chunk_size=8192) == 8 * 16 * 7813
  assert heads.pad_num_classes(37, 8) == 40
  assert heads.pad_num_classes(37, 8, chunk_size=2) == 48  # shards of 5 -> 3 chunks of 2
  assert heads.pad_num_classes(37, 8, chunk_size=100) == 40  # one chunk per shard


def test_bad_chunk_size_raises():
  mesh = _mesh((2, 4))
  emb, labels, centers, _ = _inputs(40)
  f = _sharded_fn(mesh, BOTH, BOTH, "cosface", chunk_size=3)
  with pytest.raises(ValueError, match="chunk_size=3"):
    f(emb, labels, centers, None)


def test_logits_never_gathered():
  mesh = _mesh((2, 4))
  c_pad = 40
  emb, labels, centers, _ = _inputs(c_pad)
  args = _place(mesh, BOTH, BOTH, emb, labels, centers, None)
  f = _sharded_fn(mesh, BOTH, BOTH, "arcface")
  step = jax.jit(jax.value_and_grad(
      lambda e, c: f(e, args[1], c, None)[0], argnums=(0, 1)))
  hlo = step.lower(args[0], args[2]).compile().as_text()
  gathers = re.findall(r"= (\S+) all-gather(?:-start)?\(", hlo)
  assert gathers, "expected the embedding all-gather"
  for shape in gathers:
    dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])[1:]]
    assert c_pad not in dims and NUM_CLASSES not in dims, shape


def test_chunking_bounds_temporaries():
  """Forward + backward temporaries shrink from O(rows x C_local) with chunks."""
  mesh = _mesh((2, 4))
  rows, c_pad = 64, 8 * 2048
  spec = lambda *p: NamedSharding(mesh, P(*p))
  emb = jax.ShapeDtypeStruct((rows, DIM), jnp.float32, sharding=spec(BOTH, None))
  lab = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=spec(BOTH))
  cen = jax.ShapeDtypeStruct((c_pad, DIM), jnp.float32,
                             sharding=spec(BOTH, None))
  temp = {}
  for chunk in (None, 128):
    f = functools.partial(
        heads.margin_softmax_loss, num_classes=c_pad - 3,
        margin_fn=heads.make_margin("arcface"), mesh=mesh, batch_axes=BOTH,
        class_axes=BOTH, chunk_size=chunk)
    step = jax.jit(jax.value_and_grad(lambda e, l, c: f(e, l, c)[0],
                                      argnums=(0, 2)))
    temp[chunk] = step.lower(emb, lab, cen).compile().memory_analysis(
    ).temp_size_in_bytes
  logits_bytes = rows * (c_pad // 8) * 4  # One local logits matrix.
  assert temp[None] >= 2 * logits_bytes
  assert temp[128] < logits_bytes, temp
