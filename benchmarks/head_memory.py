"""What the class-sharded head costs per device, from XLA's compiled memory analysis.

`head_memory(...)` compiles the head's whole train step (margin-softmax loss, gradients w.r.t.
embeddings and centres, AdamW on the centres, donated state) for abstract inputs and reads
`compile().memory_analysis()`: nothing is allocated, so 10^8 classes on 256 simulated CPU devices
compile on a laptop. Used by benchmarks/classifier_scaling.py, benchmarks/head_speed.py and colab/sharding.ipynb
(`from benchmarks import head_memory` from the repository root).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from oclear_jax.heads import center_optimizer
from oclear_jax.heads import class_shards
from oclear_jax.heads import margins
from oclear_jax.heads import sharded_softmax

GIB = 2.0**30
ADAM_SLOTS = 2
AXES = ("data", "model")


def mesh_of(num_devices: int) -> jax.sharding.Mesh:
  """A (num_devices, 1) ('data', 'model') mesh over the first devices."""
  return jax.make_mesh((num_devices, 1), AXES, devices=jax.devices()[:num_devices],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def make_center_tx(state: str = "f32") -> optax.GradientTransformation:
  """'f32': optax AdamW (moments in the centres' dtype); 'small': bf16 mu, factored nu, stochastic
  rounding (center_optimizer.center_adam); 'bf16': bf16 mu and nu, no factoring."""
  if state == "f32":
    return optax.adamw(1e-3, weight_decay=1e-4)
  return center_optimizer.center_adam(1e-3, weight_decay=1e-4, state_dtype=jnp.bfloat16,
                                      factored=state == "small", stochastic_rounding=True)


def head_train_step(mesh, *, num_classes, batch, dim, chunk, class_axes, compute_dtype, param_dtype,
                    partial_fc_rate=None, opt_state="f32"):
  """(jitted step, abstract args) for the head alone: loss + grads + AdamW on the centres."""
  batch_axes = AXES
  n_shards = class_shards.num_class_shards(mesh, class_axes)
  c_pad = class_shards.pad_num_classes(num_classes, n_shards, chunk_size=chunk)
  tx = make_center_tx(opt_state)
  margin = margins.make_margin("cosface", scale=64.0, margin=0.35)

  def loss(centers, emb, labels, key):
    return sharded_softmax.margin_softmax_loss(
        emb, labels, centers, num_classes=num_classes, margin_fn=margin, mesh=mesh, batch_axes=batch_axes,
        class_axes=class_axes, chunk_size=chunk, compute_dtype=compute_dtype, partial_fc_rate=partial_fc_rate,
        sample_key=key)[0]

  def step(state, emb, labels, key):
    value, (g_centers, g_emb) = jax.value_and_grad(loss, argnums=(0, 1))(state["centers"], emb, labels, key)
    updates, opt_state = tx.update(g_centers, state["opt"], state["centers"])
    return {"centers": optax.apply_updates(state["centers"], updates), "opt": opt_state}, value, g_emb

  centers_sharding = NamedSharding(mesh, P(class_axes or None, None))
  centers = jax.ShapeDtypeStruct((c_pad, dim), param_dtype, sharding=centers_sharding)
  opt = jax.eval_shape(tx.init, centers)
  replicated = NamedSharding(mesh, P())
  rows_sharding = NamedSharding(mesh, P(class_axes or None))
  opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
      centers_sharding if x.shape == centers.shape else rows_sharding if x.shape == (c_pad,) else replicated)),
                     opt)
  state = {"centers": centers, "opt": opt}
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P(batch_axes, None)))
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, P(batch_axes)))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  jitted = jax.jit(step, in_shardings=(state_shardings, emb.sharding, labels.sharding, replicated),
                   out_shardings=(state_shardings, replicated, emb.sharding), donate_argnums=(0,))
  return jitted, (state, emb, labels, key), c_pad


def head_memory(num_devices, num_classes, dim, batch, chunk, compute_dtype="float32", param_dtype="float32",
                partial_fc_rate=None, opt_state="f32") -> dict:
  """One row of per-device memory figures (GiB) for the head train step on `num_devices`."""
  mesh = mesh_of(num_devices)
  step, args, c_pad = head_train_step(
      mesh, num_classes=num_classes, batch=batch, dim=dim, chunk=chunk, class_axes=AXES,
      compute_dtype=jnp.dtype(compute_dtype), param_dtype=jnp.dtype(param_dtype), partial_fc_rate=partial_fc_rate,
      opt_state=opt_state)
  t0 = time.perf_counter()
  mem = step.lower(*args).compile().memory_analysis()
  compile_s = time.perf_counter() - t0
  pbytes = jnp.dtype(param_dtype).itemsize
  if opt_state == "f32":
    row_bytes, extra = dim * pbytes * (1 + ADAM_SLOTS), 4  # + Adam's step count
  else:
    row_bytes = center_optimizer.state_bytes_per_row(dim, param_dtype, "bfloat16", opt_state == "small")
    extra = 4 + (dim * 4 if opt_state == "small" else 0)  # step count, replicated column factor
  state_bytes = c_pad * row_bytes / num_devices + extra
  inputs_bytes = (batch * dim * 4 + batch * 4) / num_devices
  ideal = num_classes * row_bytes / num_devices
  block = chunk or c_pad // num_devices
  logits_block = batch * block * 4
  shard_bytes = c_pad * dim * pbytes / num_devices
  return dict(
      N=num_devices, C=num_classes, d=dim, chunk=chunk or "-", dtype=f"{_short(param_dtype)}/{_short(compute_dtype)}",
      opt=opt_state,
      args_gib=mem.argument_size_in_bytes / GIB, temp_gib=mem.temp_size_in_bytes / GIB, shard_gib=shard_bytes / GIB,
      ratio=(mem.argument_size_in_bytes - inputs_bytes) / ideal,
      padded=c_pad / num_classes - 1,
      rest_per_block=(mem.temp_size_in_bytes - shard_bytes) / logits_block,  # minus the centres' gradient
      peak_gib=(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes) / GIB,
      compile_s=compile_s, state_check=abs(state_bytes + inputs_bytes - mem.argument_size_in_bytes) < 1024)


def _short(dtype: str) -> str:
  return {"float32": "f32", "bfloat16": "bf16"}[dtype]
