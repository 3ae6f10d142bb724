"""Per-backend choices for the towers: compute dtype, convolution implementation, rematerialisation.

Why one place: a config says `model.dtype='auto'` (and `conv_impl='auto'`), and the same run
then computes in bfloat16 with XLA's own convolutions on a GPU/TPU, and in float32 with the
CPU-fast convolutions on a CPU, without a config fork per backend. 'auto' is resolved once, when
the model is built (`with_options`, called by `models.build_model`), from `jax.default_backend()`.

Parameters always stay float32 (`param_dtype`): bf16 is a *compute* dtype only, so optimizer
updates, checkpoints and pretrained weights are the same for every choice, and each tower casts
its outputs back to float32 before the heads, the fusion and the normalisation.
Towers built directly (tests, weight loaders) default to float32, no remat: bitwise as before.
"""
from __future__ import annotations

import dataclasses
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


def compute_dtype(name: str, backend: str | None = None) -> jnp.dtype:
  """'auto' -> bfloat16 on GPU/TPU (their matmul units' native type), float32 on CPU (no bf16 gain there)."""
  name = _check("dtype", name, DTYPES)
  if name == "auto":
    name = "float32" if on_cpu(backend) else "bfloat16"
  return jnp.dtype(name)


def conv_impl(name: str, backend: str | None = None) -> str:
  """'auto' -> 'cpu_tricks' on CPU (shifted slices, im2col: ~8x faster there), else 'xla' (cuDNN/TPU convs)."""
  name = _check("conv_impl", name, CONV_IMPLS)
  if name == "auto":
    return "cpu_tricks" if on_cpu(backend) else "xla"
  return name


def check_remat(name: str) -> str:
  return _check("remat", name, REMATS)


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


def _get(config: Any, name: str, default: str) -> Any:
  value = config.get(name) if hasattr(config, "get") else getattr(config, name, None)  # ConfigDict, dict, dataclass
  return default if value is None else value


def _tower_with(tower: nn.Module | None, *, dtype: jnp.dtype, dtype_asked: bool, remat: str,
                impl: str) -> nn.Module | None:
  """`tower` with the options it has fields for; asking a tower for bf16 or remat it lacks is an error."""
  if tower is None:
    return None
  names = {f.name for f in dataclasses.fields(tower)}
  values: dict[str, Any] = {}
  if "dtype" in names:
    values["dtype"] = dtype
  elif dtype_asked and dtype != jnp.float32:
    raise ValueError(f"config.model.dtype={dtype.name!r} but the {type(tower).__name__} tower computes in "
                     f"float32 only; set config.model.dtype='float32' or 'auto'")
  if "remat" in names:
    values["remat"] = remat
  elif remat != "none":
    raise ValueError(f"config.model.remat={remat!r} but the {type(tower).__name__} tower has no remat "
                     f"option; set config.model.remat='none'")
  if "conv_impl" in names:  # only convolutional towers have a choice to make
    values["conv_impl"] = impl
  return tower.clone(**values) if values else tower


def with_options(model: nn.Module, model_config: Any) -> nn.Module:
  """`model` (an OclearModel) whose towers carry `model.dtype`, `model.remat` and `model.conv_impl`.

  A tower without a `dtype` field stays float32 under 'auto' (a config asking it for bfloat16
  fails); one without `conv_impl` (the transformers) ignores it.
  """
  dtype_name = _get(model_config, "dtype", "auto")
  options = dict(dtype=compute_dtype(dtype_name), dtype_asked=dtype_name != "auto",
                 remat=check_remat(_get(model_config, "remat", "none")),
                 impl=_check("conv_impl", _get(model_config, "conv_impl", "auto"), CONV_IMPLS))
  return model.clone(image_encoder=_tower_with(model.image_encoder, **options),
                     text_encoder=_tower_with(model.text_encoder, **options))
