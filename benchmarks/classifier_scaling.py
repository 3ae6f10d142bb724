r"""Per-device memory and step time of the class-sharded margin-softmax head.

  python benchmarks/classifier_scaling.py            # memory table (compile only) + step-time ratio
  python benchmarks/classifier_scaling.py --pod_config  # also compile configs/pod_100m.py's head

Memory comes from XLA's compiled memory analysis of the head's whole train step (loss, gradients
w.r.t. embeddings and centres, AdamW update, donated state): `jit(...).lower(...).compile()
.memory_analysis()` on simulated CPU devices; nothing is allocated, so 10^8 x 512 on 256 devices
compiles on a laptop. `ratio` = per-device (centres + optimizer state) / the ideal
C*d*bytes*(1 + Adam's 2 slots)/N. Temporaries hold one centres-shard-sized array (the centres'
gradient: O(C*d/N), like the parameters; the chunked head's custom backward writes it in place and
AdamW updates the donated state in place) plus the softmax work;
`rest/block` = (temp - shard) / one [rows x classes] f32 block (rows = the whole global batch:
each device scores every row against its own classes), where the block is `C/N` classes without
chunking and `chunk` classes with it: a constant column means O(B*C/N), resp. O(B*chunk).

Step time: 8 simulated devices, C = 1M, d = 256: the sharded head vs the same head with its
centres replicated (plain data parallelism), both timed in this run on this machine.
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=256"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import text_table  # noqa: E402  (benchmarks/)
import head_memory  # noqa: E402  (benchmarks/)
from head_memory import AXES, GIB, head_train_step  # noqa: E402



def _compiled_head(mesh, class_axes, *, num_classes, batch, dim, chunk):
  step, args, _ = head_train_step(
      mesh, num_classes=num_classes, batch=batch, dim=dim, chunk=chunk, class_axes=class_axes,
      compute_dtype=jnp.float32, param_dtype=jnp.float32)
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
  return compiled, args, (mem.argument_size_in_bytes + mem.temp_size_in_bytes) * mesh.size / GIB


def largest_fitting_classes(mesh, *, num_classes, batch, dim, budget_gib):
  """The replicated head holds 8 copies of centres + Adam: halve C until it fits this host."""
  while num_classes > 1000:
    *_, total = _compiled_head(mesh, (), num_classes=num_classes, batch=batch, dim=dim, chunk=None)
    if total <= budget_gib:
      return num_classes, total
    num_classes //= 2
  return num_classes, float("nan")


def time_step(mesh, class_axes, *, num_classes, batch, dim, chunk, repeats):
  compiled, (state, emb, labels, key), total = _compiled_head(
      mesh, class_axes, num_classes=num_classes, batch=batch, dim=dim, chunk=chunk)
  init = jax.jit(lambda k: {"centers": jax.random.normal(k, state["centers"].shape) * 0.01},
                 out_shardings={"centers": state["centers"].sharding})
  real = init(jax.random.key(0))
  real["opt"] = jax.jit(optax.adamw(1e-3).init, out_shardings=jax.tree.map(lambda x: x.sharding, state["opt"]))(
      real["centers"])
  e = jax.device_put(np.random.default_rng(0).normal(size=emb.shape).astype(np.float32), emb.sharding)
  l = jax.device_put(np.random.default_rng(1).integers(0, num_classes, labels.shape).astype(np.int32), labels.sharding)
  k = jax.device_put(jax.random.key(0), key.sharding)
  real, loss, _ = compiled(real, e, l, k)  # warm-up
  loss.block_until_ready()
  t0 = time.perf_counter()
  for _ in range(repeats):
    real, loss, _ = compiled(real, e, l, k)
  loss.block_until_ready()
  return (time.perf_counter() - t0) / repeats, total


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", default="8,64,256")
  parser.add_argument("--classes", default="1000000,10000000,100000000")
  parser.add_argument("--dims", default="256,512")
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--chunk", type=int, default=8192)
  parser.add_argument("--pod_config", action="store_true", help="also compile configs/pod_100m.py's head")
  parser.add_argument("--time_classes", type=int, default=1_000_000)
  parser.add_argument("--time_dim", type=int, default=256)
  parser.add_argument("--time_batch", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_timing", action="store_true")
  args = parser.parse_args()
  columns = ["N", "C", "d", "chunk", "dtype", "args_gib", "shard_gib", "temp_gib", "rest_per_block", "peak_gib",
             "ratio", "compile_s"]

  print(f"\n== Per-device memory of the head train step, global batch {args.batch} (compile only) ==")
  rows = []
  for n in map(int, args.devices.split(",")):
    for c in map(int, args.classes.split(",")):
      for d in map(int, args.dims.split(",")):
        for chunk in (None, args.chunk):
          if chunk and (c // n) <= chunk:
            continue  # the shard is a single chunk already
          rows.append(head_memory.head_memory(n, c, d, args.batch, chunk))
          print(f"compiled N={n} C={c:,} d={d} chunk={chunk}: peak {rows[-1]['peak_gib']:.2f} GiB", flush=True)
  print("\nAll rows:")
  text_table.print_table(rows, columns)
  worst = max(r["ratio"] for r in rows)
  print(f"max params+optimizer ratio to ideal: {worst:.4f} (target <= 1.05); argument bytes equal "
        f"padded centres + 2 Adam slots + this device's batch in {sum(r['state_check'] for r in rows)}/{len(rows)} rows")
  big = [r for r in rows if r["N"] == 256 and r["C"] == 100_000_000 and r["d"] == 512]
  for r in big:
    print(f"100M x 512 on 256 devices, chunk {r['chunk']}: peak {r['peak_gib']:.2f} GiB per device "
          f"({'fits' if r['peak_gib'] <= 16 else 'does NOT fit'} in 16 GiB)")

  if args.pod_config:
    from configs import pod_100m  # pylint: disable=g-import-not-at-top
    cfg = pod_100m.get_config()
    n = abs(int(np.prod(cfg.mesh.shape))) if -1 not in cfg.mesh.shape else 256
    print(f"\n== configs/pod_100m.py head on {n} devices ==")
    pod = [head_memory.head_memory(n, pod_100m.NUM_CLASSES, cfg.model.embed_dim, cfg.train.batch_size, cfg.head.chunk_size,
                      cfg.head.dtype, cfg.head.param_dtype,
                      cfg.head.partial_fc_rate if cfg.head.partial_fc_rate < 1 else None)]
    text_table.print_table(pod, columns)

  if not args.skip_timing:
    mesh = head_memory.mesh_of(8)
    host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    classes, replicated_gib = largest_fitting_classes(
        mesh, num_classes=args.time_classes, batch=args.time_batch, dim=args.time_dim, budget_gib=0.5 * host_gib)
    if classes != args.time_classes:
      *_, wanted_gib = _compiled_head(mesh, (), num_classes=args.time_classes, batch=args.time_batch,
                                      dim=args.time_dim, chunk=None)
      print(f"\nThe replicated head at C={args.time_classes:,} needs {wanted_gib:.1f} GiB on this {host_gib:.0f} GiB "
            f"host (8 copies of centres + Adam); timing both heads at C={classes:,} instead "
            f"({replicated_gib:.1f} GiB).")
    print(f"\n== Step time, 8 simulated devices, C={classes:,}, d={args.time_dim}, "
          f"global batch {args.time_batch} ==")
    results = []
    for name, class_axes in (("sharded by class", AXES), ("replicated (data parallel)", ())):
      seconds, total_gib = time_step(mesh, class_axes, num_classes=classes, batch=args.time_batch,
                                     dim=args.time_dim, chunk=None, repeats=args.repeats)
      results.append((name, seconds, total_gib))
    base = results[1][1]
    print(f"{'head':28s} {'s/step':>8s} {'vs replicated':>14s} {'host GiB (all 8)':>17s}")
    for name, seconds, total_gib in results:
      print(f"{name:28s} {seconds:8.3f} {base / seconds:13.2f}x {total_gib:17.2f}")


if __name__ == "__main__":
  main()
