r"""Time of the class-sharded head's whole train step, and what a small optimizer state costs.

  nice -n 10 python benchmarks/head_speed.py                 # all sections (~10-20 min on 2 cores)
  python benchmarks/head_speed.py --sections=chunk --repeats=3

On 8 simulated CPU devices (a ('data', 'model') = (8, 1) mesh, classes and batch split over both),
each timed step is the head's whole train step: margin-softmax loss, gradients w.r.t. the centres
and the embeddings, AdamW on the centres (donated state). Every variant of a section shares one
state and the variants run round-robin, `--repeats` rounds after a warm-up, so load on the machine
hits all of them alike; the table gives the median and the ratio to the section's baseline.

Sections:
  chunk   unchunked (autodiff, the [rows, C/N] block kept) vs chunked (custom VJP: an online
          log-sum-exp loop forward, one rescan backward) at a C where both fit; f32 and bf16 matmuls.
  pfc     Partial FC at rates 1.0, 0.3, 0.1 against the full softmax at C = 1M: the dense step
          (gradient scattered into the whole shard, Adam over every row) and the row-sparse step
          (gather the sampled rows of centres and moments, update them, scatter them back).
  memory  per-device memory of 100M x 512 with Adam on 32 devices (compile only): f32 state,
          bf16 moments, and bf16 + factored second moment.
  quality a small problem (embedding projection + centres, clustered data) trained with f32 Adam
          state and with the small state: final loss, recall@1 of held-out queries, accuracy.
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=32"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import text_table  # noqa: E402  (benchmarks/)
from oclear_jax.heads import center_optimizer as co  # noqa: E402
import head_memory  # noqa: E402  (benchmarks/)
from oclear_jax.heads import class_shards, margins, partial_fc, sharded_softmax  # noqa: E402
from head_memory import AXES, head_train_step  # noqa: E402

MARGIN = margins.make_margin("cosface", scale=64.0, margin=0.35)


def _state_and_inputs(mesh, state, emb, labels, key, num_classes):
  """Real arrays for head_train_step's abstract args (centres ~ N(0, 0.01), Adam state zero)."""
  centers = jax.jit(lambda k: 0.01 * jax.random.normal(k, state["centers"].shape, state["centers"].dtype),
                    out_shardings=state["centers"].sharding)(jax.random.key(0))
  opt = jax.jit(optax.adamw(1e-3, weight_decay=1e-4).init,
                out_shardings=jax.tree.map(lambda x: x.sharding, state["opt"]))(centers)
  rng = np.random.default_rng(0)
  e = jax.device_put(rng.normal(size=emb.shape).astype(np.float32), emb.sharding)
  l = jax.device_put(rng.integers(0, num_classes, labels.shape).astype(np.int32), labels.sharding)
  return {"centers": centers, "opt": opt}, e, l, jax.device_put(jax.random.key(1), key.sharding)


def sparse_pfc_step(mesh, *, num_classes, c_pad, rate, batch, dim):
  """Row-sparse Partial FC step on the same state as head_train_step (optax adamw, f32)."""
  def step(state, emb, labels, key):
    local_ids, class_ids = partial_fc.sample_class_rows(
        key, labels, num_classes=num_classes, c_pad=c_pad, rate=rate, mesh=mesh, batch_axes=AXES,
        class_axes=AXES)
    adam = state["opt"][0]
    rows, mu, nu = (co.gather_rows(x, local_ids, mesh, AXES) for x in (state["centers"], adam.mu, adam.nu))

    def loss(c, e):
      return sharded_softmax.margin_softmax_loss(
          e, labels, c, num_classes=num_classes, margin_fn=MARGIN, mesh=mesh, batch_axes=AXES,
          class_axes=AXES, class_ids=class_ids)[0]
    value, (g_rows, g_emb) = jax.value_and_grad(loss, argnums=(0, 1))(rows, emb)
    count = optax.safe_increment(adam.count)
    rows, mu, nu = co.sparse_adam_rows(rows, g_rows, mu, nu, count, learning_rate=1e-3, weight_decay=1e-4)
    put = lambda x, r: co.scatter_rows(x, local_ids, r, mesh, AXES)
    opt = (adam._replace(count=count, mu=put(adam.mu, mu), nu=put(adam.nu, nu)),) + tuple(state["opt"][1:])
    return {"centers": put(state["centers"], rows), "opt": opt}, value, g_emb
  return step


def time_section(mesh, variants, *, num_classes, batch, dim, repeats):
  """variants: [(name, dict(chunk=, rate=, compute_dtype=, sparse=))]; one shared state, round-robin."""
  compiled, args = {}, None
  for name, v in variants:
    step, abstract, c_pad = head_train_step(
        mesh, num_classes=num_classes, batch=batch, dim=dim, chunk=v.get("chunk"), class_axes=AXES,
        compute_dtype=jnp.dtype(v.get("compute_dtype", "float32")), param_dtype=jnp.float32,
        partial_fc_rate=v.get("rate"))
    if v.get("sparse"):
      shardings = jax.tree.map(lambda x: x.sharding, abstract)
      step = jax.jit(sparse_pfc_step(mesh, num_classes=num_classes, c_pad=c_pad, rate=v["rate"], batch=batch,
                                     dim=dim), in_shardings=shardings,
                     out_shardings=(shardings[0], shardings[3], shardings[1]), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled[name] = step.lower(*abstract).compile()
    print(f"  compiled {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    if args is None:
      args = list(_state_and_inputs(mesh, *abstract, num_classes))
  times = {name: [] for name, _ in variants}
  losses = {}
  for r in range(repeats + 1):
    for name, _ in variants:
      t0 = time.perf_counter()
      args[0], loss, _ = compiled[name](*args)
      loss.block_until_ready()
      if r:  # round 0 warms up
        times[name].append(time.perf_counter() - t0)
      losses[name] = float(loss)
    print(f"  round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n, _ in variants if r), flush=True)
  base = float(np.median(times[variants[0][0]]))
  return [dict(step=name, s_per_step=float(np.median(times[name])), vs_base=float(np.median(times[name])) / base,
               min_s=float(np.min(times[name])), loss=losses[name]) for name, _ in variants]


def quality(mesh, *, steps, num_classes=2000, dim=64, in_dim=128, batch=256, lr=3e-3):
  """Train W (in_dim -> dim, f32 Adam) + centres on clustered data with each centre optimizer."""
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(num_classes, in_dim)).astype(np.float32)
  sample = lambda labels: protos[labels] + 1.0 * rng.normal(size=(len(labels), in_dim)).astype(np.float32)
  c_pad = class_shards.pad_num_classes(num_classes, 8, chunk_size=64)
  train_labels = [rng.integers(0, num_classes, batch).astype(np.int32) for _ in range(steps)]
  train_x = [sample(l) for l in train_labels]
  all_classes = np.arange(num_classes, dtype=np.int32)
  query_x, gallery_x = sample(all_classes), sample(all_classes)
  rows = NamedSharding(mesh, P(AXES, None))
  setups = [("f32 Adam state", jnp.float32, optax.adamw(lr, weight_decay=1e-4)),
            ("bf16 centres+mu, factored nu, stoch. rounding", jnp.bfloat16,
             co.center_adam(lr, weight_decay=1e-4)),
            ("bf16 centres+mu, factored nu, round-to-nearest", jnp.bfloat16,
             co.center_adam(lr, weight_decay=1e-4, stochastic_rounding=False)),
            ("bf16 centres+mu+nu (unfactored), stoch. rounding", jnp.bfloat16,
             co.center_adam(lr, weight_decay=1e-4, factored=False))]
  out = []
  for name, pdtype, tx in setups:
    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (in_dim, dim)) / np.sqrt(in_dim),
              "centers": jax.device_put((0.01 * jax.random.normal(jax.random.key(1), (c_pad, dim))).astype(pdtype),
                                        rows)}
    w_tx = optax.adam(lr)
    state = (w_tx.init(params["w"]), tx.init(params["centers"]))

    @jax.jit
    def step(params, state, x, labels):
      def loss(p):
        return sharded_softmax.margin_softmax_loss(
            x @ p["w"], labels, p["centers"], num_classes=num_classes, margin_fn=margins.make_margin(
                "cosface", scale=30.0, margin=0.2), mesh=mesh, batch_axes=AXES, class_axes=AXES, chunk_size=64)
      (value, aux), g = jax.value_and_grad(loss, has_aux=True)(params)
      uw, sw = w_tx.update(g["w"], state[0], params["w"])
      uc, sc = tx.update(g["centers"], state[1], params["centers"])
      return {"w": params["w"] + uw, "centers": optax.apply_updates(params["centers"], uc)}, (sw, sc), value, aux
    losses = []
    for x, l in zip(train_x, train_labels):
      params, state, value, aux = step(params, state, jnp.asarray(x), jnp.asarray(l))
      losses.append(float(value))
    w = np.array(params["w"])
    q, g = query_x @ w, gallery_x @ w
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    c = np.array(params["centers"], np.float32)[:num_classes]
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out.append(dict(state=name, final_loss=float(np.mean(losses[-20:])),
                    recall_at_1=float(np.mean(np.argmax(q @ g.T, axis=1) == all_classes)),
                    centre_acc=float(np.mean(np.argmax(q @ c.T, axis=1) == all_classes))))
    print(f"  {name}: loss {out[-1]['final_loss']:.3f}", flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sections", default="chunk,pfc,memory,quality")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--chunk_classes", type=int, default=262_144)
  parser.add_argument("--chunk_batch", type=int, default=1024)
  parser.add_argument("--pfc_classes", type=int, default=1_000_000)
  parser.add_argument("--pfc_batch", type=int, default=256)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--quality_steps", type=int, default=400)
  args = parser.parse_args()
  sections = args.sections.split(",")
  mesh = head_memory.mesh_of(8)
  cols = ["step", "s_per_step", "min_s", "vs_base"]  # losses differ: the variants train one shared state in turn

  if "chunk" in sections:
    print(f"\n== Chunked vs unchunked head step: 8 devices, C={args.chunk_classes:,}, d={args.dim}, "
          f"global batch {args.chunk_batch}, median of {args.repeats} ==", flush=True)
    variants = [("unchunked f32", {})] + [(f"chunk {c} f32", dict(chunk=c)) for c in (2048, 8192, 16384)] + [
        ("unchunked bf16", dict(compute_dtype="bfloat16")),
        ("chunk 8192 bf16", dict(chunk=8192, compute_dtype="bfloat16"))]
    rows = time_section(mesh, variants, num_classes=args.chunk_classes, batch=args.chunk_batch, dim=args.dim,
                        repeats=args.repeats)
    text_table.print_table(rows, cols)
    worst = max(r["vs_base"] for r in rows if r["step"].startswith("chunk") and "f32" in r["step"])
    print(f"worst chunked f32 / unchunked f32: {worst:.2f}x (target <= 1.3x)")

  if "pfc" in sections:
    print(f"\n== Partial FC vs full softmax: 8 devices, C={args.pfc_classes:,}, d={args.dim}, "
          f"global batch {args.pfc_batch}, median of {args.repeats} ==", flush=True)
    variants = [("full softmax", {})] + [(f"pfc {r} dense", dict(rate=r)) for r in (1.0, 0.3, 0.1)] + [
        (f"pfc {r} row-sparse", dict(rate=r, sparse=True)) for r in (0.3, 0.1)]
    rows = time_section(mesh, variants, num_classes=args.pfc_classes, batch=args.pfc_batch, dim=args.dim,
                        repeats=args.repeats)
    for r in rows:
      r["speedup"] = 1.0 / r["vs_base"]
    text_table.print_table(rows, cols + ["speedup"])
    best = max(r["speedup"] for r in rows if "0.1" in r["step"])
    print(f"Partial FC 0.1 speed-up over the full softmax: {best:.2f}x (target >= 2x)")

  if "memory" in sections:
    print("\n== 100M x 512, Adam, 32 devices, global batch 4096, chunk 8192, bf16 matmuls (compile only) ==",
          flush=True)
    rows = [head_memory.head_memory(32, 100_000_000, 512, 4096, 8192, "bfloat16", pd, opt_state=o)
            for pd, o in (("float32", "f32"), ("bfloat16", "bf16"), ("bfloat16", "small"))]
    text_table.print_table(rows, ["N", "C", "d", "chunk", "dtype", "opt", "args_gib", "shard_gib", "temp_gib",
                                  "peak_gib", "ratio"])
    print(f"smallest peak: {min(r['peak_gib'] for r in rows):.2f} GiB per device (target <= 16)")

  if "quality" in sections:
    print(f"\n== What the small state costs: 2,000 classes, {args.quality_steps} steps ==", flush=True)
    text_table.print_table(quality(mesh, steps=args.quality_steps),
                           ["state", "final_loss", "recall_at_1", "centre_acc"])


if __name__ == "__main__":
  main()
