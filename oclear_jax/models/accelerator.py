"""Per-backend choices for the towers: compute dtype, convolution implementation, rematerialisation.

Why one place: a config says `model.dtype='auto'` (and `conv_impl='auto'`), and the same run
then computes in bfloat16 with XLA's own convolutions on a GPU/TPU, and in float32 with the
CPU-fast convolutions on a CPU, without a config fork per backend. The three are fields of
`oclear.ModelConfig` (validated here); the tower builders pass them to the towers as module
attributes when `models.build_model` builds the model. The dtype's 'auto' is resolved then
(`ModelConfig.compute_dtype`), from `jax.default_backend()`; the conv's when the tower is traced.

Parameters always stay float32 (`param_dtype`): bf16 is a *compute* dtype only, so optimizer
updates, checkpoints and pretrained weights are the same for every choice, and each tower casts
its outputs back to float32 before the heads, the fusion and the normalisation.
Towers built directly (tests, weight loaders) default to float32, no remat: bitwise as before.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = ("auto", "float32", "bfloat16")
CONV_IMPLS = ("auto", "xla", "cpu_tricks")
REMATS = ("none", "blocks")


def _check(key: str, value: Any, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"config.model.{key}={value!r} is not supported; use one of {choices}")
  return value


def on_cpu(backend: str | None = None) -> bool:
  return (backend or jax.default_backend()) == "cpu"


def check_dtype(name: str) -> str:
  return _check("dtype", name, DTYPES)


def check_conv_impl(name: str) -> str:
  return _check("conv_impl", name, CONV_IMPLS)


def check_remat(name: str) -> str:
  return _check("remat", name, REMATS)


def compute_dtype(name: str, backend: str | None = None) -> jnp.dtype:
  """'auto' -> bfloat16 on GPU/TPU (their matmul units' native type), float32 on CPU (no bf16 gain there)."""
  name = check_dtype(name)
  if name == "auto":
    name = "float32" if on_cpu(backend) else "bfloat16"
  return jnp.dtype(name)


def conv_impl(name: str, backend: str | None = None) -> str:
  """'auto' -> 'cpu_tricks' on CPU (shifted slices, im2col: ~8x faster there), else 'xla' (cuDNN/TPU convs)."""
  name = check_conv_impl(name)
  if name == "auto":
    return "cpu_tricks" if on_cpu(backend) else "xla"
  return name


def maybe_remat(block: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`block` or `nn.remat(block)`: with 'blocks' the backward pass recomputes each block's activations.

  Trades FLOPs (XLA counts +23% for a ViT-B/16 train step: the forward runs twice) for keeping
  only each block's input, which is what lets a ViT-B at a large per-device batch fit on a GPU/TPU.
  XLA:CPU's compiled memory analysis shows no saving (its scheduler hoists the recomputation;
  measured on a dense stack too), so judge the memory on the accelerator. Python arguments
  (`train`) must be positional and named in `static_argnums` (counting `self` as 0):
  `jax.checkpoint` would trace keyword arguments. Parameter names are unchanged.
  """
  if check_remat(remat) == "none":
    return block
  return nn.remat(block, static_argnums=static_argnums)
