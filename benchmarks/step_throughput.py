r"""Train-step throughput and model FLOPs utilisation (MFU) of the trainer's own update step.

  python benchmarks/step_throughput.py                 # GPU/TPU: the demo model and ViT-B/16 + 1M classes
  python benchmarks/step_throughput.py --small         # CPU: the same rows, the ViT-B/16 one reduced
  python benchmarks/step_throughput.py --dtype=float32 --remat=blocks --peak_flops=2e12
  python benchmarks/step_throughput.py --compile_only --dtype=bfloat16  # CPU: full-size FLOPs and memory, no timing

Rows: `demo` is configs/demo.py:vit (the from-scratch ViT-mu on 64 px records, both heads, the
title tower, CosFace over the catalogue's ~300 classes); `vit_b16_1m` is configs/pod_100m.py's
model (ViT-B/16 at 224 px, a 4-layer title tower, 512-d embeddings) with 1,000,000 class centres
sharded over every device, scored in chunks of 8,192. `--small` keeps ViT-B/16 but shrinks the
row to 32 px (4 patches), 100k classes, a 2,000-token title vocabulary and batch 16, so it runs in
a couple of minutes on a 2-core CPU.

The step is `trainer.OclearTask.train_step` (forward, backward, clipping, AdamW) on a synthetic
batch placed as the trainer places one, on a ('data', 'model') mesh over all local devices; on CPU
the host is split into `--cpu_devices` simulated devices (2 by default; the tests use 8). Step time is the median of
`--steps` timed steps after two warm-up steps. FLOPs come from XLA's cost analysis of the compiled
step (`jit(...).lower(...).compile().cost_analysis()`): those of one device's partitioned program,
so MFU = flops / step time / that device's peak. XLA counts what it runs, so with remat the
recomputed forward is included (closer to hardware FLOPs utilisation). The peak is per device
kind and compute dtype (`PEAK_FLOPS`); elsewhere (CPU) MFU prints as n/a unless `--peak_flops` says.
`gib_per_device` is XLA's compiled memory analysis (arguments + temporaries of one device's program);
`peak_gib` the allocator's measured peak where the backend keeps one (GPU/TPU). `siglip_b16_1m` is
configs/siglip_b16.py (SigLIP B/16 from a checkpoint's architecture, 1M classes, 256 rows per device).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--small", action="store_true",
                 help="reduced ViT-B/16 row (CPU): 32 px, 100k classes, 2,000-token vocabulary, batch 16")
  p.add_argument("--rows", default="demo,vit_b16_1m", help="comma-separated: demo, vit_b16_1m, siglip_b16_1m")
  p.add_argument("--checkpoint", default="", help="siglip_b16_1m: hf:FOLDER of its architecture (default: "
                 "tests/data/towers/full/siglip_b16, SigLIP B/16's config without weights)")
  p.add_argument("--dtype", default="auto", help="config.model.dtype: auto | float32 | bfloat16")
  p.add_argument("--remat", default="none", help="config.model.remat: none | blocks")
  p.add_argument("--batch_size", type=int, default=0, help="global batch of every row (0: the row's own)")
  p.add_argument("--steps", type=int, default=0, help="timed steps (0: 10, 3 with --small)")
  p.add_argument("--peak_flops", type=float, default=0.0, help="peak FLOP/s per device (0: from PEAK_FLOPS)")
  p.add_argument("--compile_only", action="store_true",
                 help="compile and count FLOPs and memory only (e.g. the full-size rows on a CPU); no timing")
  p.add_argument("--cpu_devices", type=int, default=2,
                 help="simulated devices on CPU (each holds a copy of the replicated state: 2 keeps --small in ~6 GiB)")
  return p.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported; it only splits the host platform, GPUs/TPUs are untouched
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.cpu_devices}").strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import text_table  # noqa: E402  (benchmarks/)
from configs import demo  # noqa: E402
from configs import pod_100m  # noqa: E402
from configs import siglip_b16  # noqa: E402
from oclear_jax import sharding  # noqa: E402
from oclear_jax.train import trainer  # noqa: E402
from oclear_jax.models import accelerator  # noqa: E402

# Dense peak FLOP/s per device from the vendors' sheets: (substring of device_kind, bf16, float32).
# float32 is what XLA runs by default: TF32 tensor cores on NVIDIA (A100 on), one bf16 pass on TPUs.
# First match wins (so 'v5 lite' before 'v5'). H100/H200 are the SXM parts (PCIe H100: 756e12 bf16).
PEAK_FLOPS = (
    ("h200", 989e12, 495e12),
    ("h100", 989e12, 495e12),
    ("a100", 312e12, 156e12),
    ("v6 lite", 918e12, 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12, 918e12),
    ("v5 lite", 197e12, 197e12),  # TPU v5e
    ("v5e", 197e12, 197e12),
    ("v5p", 459e12, 459e12),
    ("v5", 459e12, 459e12),  # TPU v5p reports "TPU v5"
    ("v4", 275e12, 275e12),
)


def peak_flops(device: jax.Device, dtype_name: str) -> float | None:
  kind = device.device_kind.lower()
  for name, bf16, f32 in PEAK_FLOPS:
    if name in kind:
      return bf16 if dtype_name == "bfloat16" else f32
  return None


# == The two models =============================================================================
def demo_config():
  """configs/demo.py:vit; ~300 classes (the built-in catalogue's products)."""
  return demo.get_config("vit"), 300, 64


def vit_b16_1m_config(small: bool):
  """configs/pod_100m.py's model with 1M classes (100k at 32 px, batch 16 with --small)."""
  c = pod_100m.get_config()
  c.mesh.shape = (-1, 1)
  if small:
    c.train.batch_size, c.data.max_title_len, c.data.vocab_size = 16, 16, 2000
    return c, 100_000, 32
  c.train.batch_size = 256 * jax.device_count()
  return c, 1_000_000, 224


SIGLIP_B16_ARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "towers", "full",
                               "siglip_b16")


def siglip_b16_1m_config(small: bool):
  """configs/siglip_b16.py: SigLIP B/16 towers (architecture from --checkpoint; the step needs no weights),
  the image tower fine-tuned, the text tower frozen, 1M classes (100k at 32 px, batch 16 with --small)."""
  c = siglip_b16.get_config("gpu")
  checkpoint = (ARGS.checkpoint if ARGS else "") or "hf:" + os.path.abspath(SIGLIP_B16_ARCH)
  c.model.image_tower = c.model.text_tower = c.data.tokenizer = checkpoint
  c.data.vocab_size = 32000  # the synthetic title ids' range (SigLIP's vocabulary)
  if small:
    c.train.batch_size, c.data.max_title_len = 16, 16
    return c, 100_000, 32
  c.train.batch_size = 256 * jax.device_count()
  return c, 1_000_000, 224


ROWS = {"demo": lambda small: demo_config(), "vit_b16_1m": vit_b16_1m_config, "siglip_b16_1m": siglip_b16_1m_config}


def synthetic_batch(config, batch_size: int, image_size: int, num_classes: int) -> dict[str, np.ndarray]:
  """What the records pipeline hands the trainer: images in [-1, 1], title ids (pad 0), labels, kinds."""
  rng = np.random.default_rng(0)
  length = config.data.max_title_len
  titles = rng.integers(1, config.data.vocab_size, (batch_size, length)).astype(np.int32)
  titles[:, length // 2:] = 0  # half padding, as short titles are
  return {"image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
          "title_tokens": titles,
          "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
          "kind": rng.integers(0, 2, batch_size).astype(np.int32)}


def _flops(compiled) -> float:
  """XLA's flop count of the compiled (per-device) program; the API returns a dict or a list of them."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan")))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def measure(name: str, args) -> dict:
  """One row: compile the trainer's step for this model, then time it (unless --compile_only)."""
  config, num_classes, image_size = ROWS[name](args.small)
  config.model.dtype, config.model.remat = args.dtype, args.remat
  config.data.stored_image_size = image_size
  if args.batch_size:
    config.train.batch_size = args.batch_size
  batch_size = config.train.batch_size
  mesh = sharding.make_mesh(config.mesh.shape)
  task = trainer.OclearTask(config, mesh, num_classes=num_classes, vocab_size=config.data.vocab_size)
  abstract, shardings = task.abstract_state()
  host_batch = synthetic_batch(config, batch_size, image_size, num_classes)
  rng = jax.random.key(1)
  step = jax.jit(task.train_step, in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(task.rules):
    batch = sharding.global_batch(host_batch, mesh, task.rules)
    start = time.perf_counter()
    # Compiled from shapes alone: --compile_only sizes a step that would not fit this host.
    compiled = step.lower(_abstract(abstract, shardings), _abstract(batch, jax.tree.map(lambda x: x.sharding, batch)),
                          rng).compile()
    compile_s = time.perf_counter() - start
    times, loss = [], float("nan")
    if not args.compile_only:
      state = task.init_state(jax.random.key(0), shardings)
      for i in range(2 + (args.steps or (3 if args.small else 10))):  # two warm-up steps
        start = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, metrics))
        if i >= 2:
          times.append(time.perf_counter() - start)
      loss = float(metrics["loss"])
  step_s = float(np.median(times)) if times else float("nan")
  flops = _flops(compiled)
  memory = compiled.memory_analysis()
  dtype_name = accelerator.compute_dtype(args.dtype).name
  peak = args.peak_flops or peak_flops(jax.devices()[0], dtype_name)
  params = sum(x.size for x in jax.tree.leaves(abstract["params"]["encoder"]))
  return {"model": name, "image": image_size, "classes": num_classes, "model_params": params,
          "dtype": dtype_name, "remat": args.remat, "devices": mesh.size, "batch": batch_size,
          "compile_s": compile_s, "step_ms": step_s * 1e3, "examples_per_s": batch_size / step_s,
          "gflop_per_device": flops / 1e9, "tflops_per_device": f"{flops / step_s / 1e12:.3g}",
          "gib_per_device": (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**30 if memory else "n/a",
          "state_gib": memory.argument_size_in_bytes / 2**30 if memory else "n/a",
          "temp_gib": memory.temp_size_in_bytes / 2**30 if memory else "n/a",
          "peak_gib": _peak_gib(),
          "mfu": f"{flops / step_s / peak:.1%}" if peak and times else "n/a", "loss": loss}


def _peak_gib():
  """The device allocator's peak (GPU/TPU; CPU keeps no statistics): what the run really held."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else "n/a"


def main(args) -> None:
  device = jax.devices()[0]
  print(f"backend {jax.default_backend()}, {jax.device_count()} x {device.device_kind}, jax {jax.__version__}; "
        f"peak {args.peak_flops or peak_flops(device, accelerator.compute_dtype(args.dtype).name) or 'unknown'} "
        f"FLOP/s per device", flush=True)
  rows = []
  for name in args.rows.split(","):
    rows.append(measure(name.strip(), args))
    print(f"  {name}: {rows[-1]['step_ms']:.0f} ms/step, compiled in {rows[-1]['compile_s']:.0f} s", flush=True)
  text_table.print_table(rows, ["model", "image", "classes", "model_params", "dtype", "remat", "devices", "batch", "compile_s",
                     "step_ms", "examples_per_s", "gflop_per_device", "tflops_per_device", "gib_per_device", "state_gib", "temp_gib", "peak_gib",
                     "mfu", "loss"], float_format="{:,.1f}")


if __name__ == "__main__":
  main(ARGS)
