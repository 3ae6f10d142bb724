"""Mesh from config, logical->mesh rules, batch placement and the "sufficiently sharded" guard.

Model code names only logical axes ('batch', 'embed', 'classes', ...). This module is the one
place that turns them into mesh axes, from `config.mesh` and `config.sharding.rules`, so a new
layout (classes over ('data', 'model') or over 'model' only, FSDP or replicated backbone) is a
config change, not a code change.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")
Rules = tuple[tuple[str, Any], ...]


def device_layout(devices: Sequence[jax.Device]) -> str:
  """'2 processes x 4 local devices': what a mesh error names beside the device count, on any host count."""
  processes = sorted({d.process_index for d in devices})
  per_process = sorted({sum(d.process_index == p for d in devices) for p in processes})
  local = "/".join(map(str, per_process)) or "0"
  return (f"{len(processes)} process{'' if len(processes) == 1 else 'es'} x {local} "
          f"local device{'' if per_process == [1] else 's'}")


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over every process's devices; one entry of `shape` may be -1 to take the rest.

  `jax.devices()` (not `local_devices()`): on N hosts the mesh spans all of them, and the same
  config.mesh.shape means the same layout whatever the host count.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config.mesh.shape={tuple(shape)} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape={tuple(shape)}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or len(devices) % known:
      raise ValueError(
          f"config.mesh.shape={tuple(shape)} cannot be filled from {len(devices)} devices "
          f"({device_layout(devices)}): {len(devices)} is not a multiple of {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} exist "
        f"({device_layout(devices)}); use -1 for one axis (e.g. --config.mesh.shape='(-1, 1)') or match the "
        f"device count")
  return jax.make_mesh(
      tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(rules: Any) -> Rules:
  """Normalizes `config.sharding.rules` (pairs of logical name -> mesh axis / tuple / None)."""
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"config.sharding.rules entry {item!r} must be a (logical_name, mesh_axes) pair")
    name, axes = item
    axes_tuple = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for axis in axes_tuple:
      if axis not in MESH_AXES:
        raise ValueError(f"config.sharding.rules maps {name!r} to unknown mesh axis {axis!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((str(name), axes_tuple[0] if len(axes_tuple) == 1 else (axes_tuple or None)))
  return tuple(out)


def mesh_axes(logical_name: str, rules: Rules) -> tuple[str, ...]:
  """The mesh axes a logical axis is split over (first matching rule wins, as in flax)."""
  for name, axes in rules:
    if name == logical_name:
      return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


def num_shards(mesh: jax.sharding.Mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def logical_sharding(mesh: jax.sharding.Mesh, rules: Rules, *logical_names: str | None) -> NamedSharding:
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_names), rules))


def tree_shardings(abstract_boxed_tree: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves are (possibly) `nn.LogicallyPartitioned` boxes."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed_tree), mesh, rules)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Turns this process's slice of a batch into global `jax.Array`s sharded along 'batch'."""
  batch_axes = mesh_axes("batch", rules)
  out = {}
  for key, value in local_batch.items():
    spec = P(batch_axes or None, *([None] * (np.ndim(value) - 1)))
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(value))
  return out


def _leaf_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_sufficiently_sharded(abstract_tree: Any, shardings: Any, max_replicated_bytes: int) -> None:
  """Refuses a layout that would replicate a large state array on every device.

  MaxText's habit: with 10^8 classes a single unsharded leaf (a forgotten rule for 'classes')
  would need hundreds of GiB per device; fail at start-up naming the array instead of OOMing
  mid-compile.
  """
  if max_replicated_bytes <= 0:
    return
  # Paired by path, not position: a parameter masked out of one optimizer (optax.partition's
  # MaskedNode) has a sharding but no array in that optimizer's state.
  by_path = {jax.tree_util.keystr(path): s for path, s in jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
    sharding = by_path[jax.tree_util.keystr(path)]
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    if nbytes > max_replicated_bytes and sharding.is_fully_replicated and sharding.num_devices > 1:
      raise ValueError(
          f"state array {_leaf_path(path)} {tuple(leaf.shape)} ({nbytes / 2**20:.1f} MiB) would be replicated on "
          f"all {sharding.num_devices} devices; add a config.sharding.rules entry for its logical axes or raise "
          f"config.sharding.max_replicated_mib")
