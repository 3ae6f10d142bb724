"""One process of tests/test_multiprocess.py's smoke run (started by `python -m oclear_jax.distributed.launch`).

Joins the others through `multihost.initialize_distributed` with the launcher's flags, then checks
what a pod run relies on and prints one `RESULT {json}` line: the device and process counts, a
mesh over every process's devices, a global batch built from per-process shares, a jitted sum and
a shard_map psum across processes against numpy, the mesh error's counts, and errors raised on
process 1 alone reaching every process (type and whole message), and `multihost.gather_objects`
of values whose size differs per process.
"""
import argparse
import json

import numpy as np


LONG_MESSAGE = "row 7 of part-1.csv has no image; " + "é" * 3000  # 6,000+ bytes of UTF-8


def failures_of_process_one() -> list[Exception]:
  """A long message, an OSError, one of the package's own types, and a type that takes no plain message."""
  from oclear_jax import checkpoint  # pylint: disable=g-import-not-at-top  (jax after the flags)
  return [ValueError(LONG_MESSAGE), FileNotFoundError(2, "No such file", "a.csv"),
          checkpoint.IncompatibleCheckpointError("step 4 has another shape"), KeyError("k")]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args()

  from oclear_jax.distributed import multihost  # pylint: disable=g-import-not-at-top  (jax after the flags)
  joined = multihost.initialize_distributed("auto", coordinator_address=args.coordinator_address,
                                            num_processes=args.num_processes, process_id=args.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from oclear_jax import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh((-1, 2))
  rules = sharding.logical_rules([("batch", "data")])
  reference = np.arange(16 * 3, dtype=np.float32).reshape(16, 3) / 7
  rows = 16 // jax.process_count()
  local = reference[jax.process_index() * rows:(jax.process_index() + 1) * rows]
  x = sharding.global_batch({"x": local}, mesh, rules)["x"]
  jit_sum = jax.jit(lambda a: (a * a).sum(axis=0), out_shardings=jax.NamedSharding(mesh, P()))(x)
  psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum((a * a).sum(axis=0), "data"),
                               mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False))(x)
  try:
    sharding.make_mesh((3, 2))
    mesh_error = ""
  except ValueError as e:
    mesh_error = str(e)
  agreed = []
  for error in failures_of_process_one():  # each raised on process 1 only: every process must raise it
    try:
      multihost.raise_if_any_process_failed(error if jax.process_index() == 1 else None)
      agreed.append("")
    except Exception as e:  # pylint: disable=broad-except  (the type is what is checked)
      agreed.append(f"{type(e).__name__}: {e}")
  from_zero = multihost.run_on_process_zero(lambda: "written once")
  index = jax.process_index()
  gathered = multihost.gather_objects(  # sizes differ per process; int64 must stay 64 bits
      {"p": index, "ids": np.arange(index + 1, dtype=np.int64) + 2**40, "title": "é" * 5000 * index})
  gathered = [{**g, "ids": [int(i) for i in g["ids"]], "dtype": g["ids"].dtype.name} for g in gathered]
  print("RESULT " + json.dumps(dict(
      joined=joined, process_index=jax.process_index(), process_count=jax.process_count(),
      device_count=jax.device_count(), local_device_count=jax.local_device_count(),
      mesh_shape=dict(mesh.shape), mesh_processes=sorted({d.process_index for d in mesh.devices.flat}),
      x_shape=list(x.shape), jit_sum_ok=bool(np.allclose(np.asarray(jit_sum), (reference ** 2).sum(0), rtol=1e-6)),
      psum_ok=bool(np.allclose(np.asarray(psum), (reference ** 2).sum(0), rtol=1e-6)),
      mesh_error=mesh_error, agreed=agreed, from_zero=from_zero, gathered=gathered)), flush=True)


if __name__ == "__main__":
  main()
