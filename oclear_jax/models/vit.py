"""The image tower: a small Vision Transformer, and the pre-LN block the text tower reuses.

A ViT rather than a ConvNet because the demo trains on a 2-core CPU, where XLA:CPU convolutions
(depthwise ones above all) are an order of magnitude slower than the same FLOPs as matmuls. Patches
are therefore cut with a reshape and embedded with a Dense layer, not a strided convolution.

Every parameter and block-boundary activation is named with *logical* axes only ('batch',
'length', 'embed', 'mlp', 'heads', 'kv', 'patch'); `oclear_jax.sharding` maps them to the mesh.

`dtype` is the compute dtype (bfloat16 on GPU/TPU through `model.dtype`, `models/accelerator.py`):
parameters stay float32 and are cast where they are used, the softmax and LayerNorm statistics
stay float32, and the tower's outputs are cast back to float32. `remat='blocks'` recomputes each
block in the backward pass. The float32 defaults compute exactly what they did before these options.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oclear_jax.models import accelerator

# (width, depth, num_heads, mlp_dim). 'nano' is the seconds-long test size, 'mu' the CPU demo size;
# 'ti', 's' and 'b' are the usual ViT-Ti/S/B.
VIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "nano": (32, 1, 2, 64),
    "mu": (128, 3, 4, 256),
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
}

TOKEN_AXES = ("batch", "length", "embed")
POOLED_AXES = ("batch", "embed")


def partitioned_dense(features: int, kernel_axes: tuple[str, str], *, name: str | None = None,
                      kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform(),
                      dtype: Any = None, use_bias: bool = True) -> nn.Dense:
  """A Dense layer whose kernel and bias carry logical axis names (the bias takes the output's).

  `dtype`: the compute dtype (None: from the inputs, as before); parameters are float32 always.
  """
  return nn.Dense(
      features, use_bias=use_bias,
      kernel_init=nn.with_logical_partitioning(kernel_init, kernel_axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), kernel_axes[-1:]),
      dtype=dtype, param_dtype=jnp.float32, name=name)


def partitioned_layer_norm(*, name: str | None = None, dtype: Any = None, epsilon: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm over 'embed'; its mean and variance are float32 whatever `dtype` (flax's float32 reductions).

  `epsilon`: 1e-6 (flax's default, ours and SigLIP's / DINOv2's); CLIP checkpoints use 1e-5.
  """
  return nn.LayerNorm(
      epsilon=epsilon, scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      dtype=dtype, param_dtype=jnp.float32, name=name)


def pool_tokens(tokens: jax.Array, pool: str, mask: jax.Array | None = None) -> jax.Array:
  """'cls' takes token 0; 'mean' averages the tokens where `mask` (default: all) is True.

  An all-False mask row pools to zeros rather than NaN, so padded (empty) titles stay finite
  and their gradients too.
  """
  if pool == "cls":
    return tokens[:, 0]
  if pool != "mean":
    raise ValueError(f"pool={pool!r} is not supported; use 'mean' or 'cls'")
  if mask is None:
    return tokens.mean(axis=1)
  weights = mask.astype(tokens.dtype)[..., None]
  return (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


# The MLP nonlinearities checkpoints were trained with: ours and SigLIP's ('gelu_pytorch_tanh'),
# DINOv2's exact erf GELU, and CLIP's quick GELU.
ACTIVATIONS: dict[str, Any] = {
    "gelu_tanh": nn.gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Any:
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Dense(width -> mlp_dim) + GELU + Dense(-> width), as in ViT and BERT (`act`: an `ACTIVATIONS` name)."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  act: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    width = x.shape[-1]
    y = partitioned_dense(self.mlp_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
    y = nn.with_logical_constraint(activation(self.act)(y), ("batch", "length", "mlp"))
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return partitioned_dense(width, ("mlp", "embed"), name="fc2", dtype=self.dtype)(y)


def _weights_times_values(equation: str, weights: jax.Array, values: jax.Array) -> jax.Array:
  """The softmax is float32 (`force_fp32_for_softmax`); its product with the values runs in their dtype."""
  return jnp.einsum(equation, weights.astype(values.dtype), values)


class SelfAttention(nn.Module):
  """Multi-head self-attention with 3-D projection kernels named ('embed', 'heads', 'kv').

  Not `nn.MultiHeadDotProductAttention`: in flax 0.12.8 its DenseGeneral calls the kernel
  initializer at the *flattened* 2-D shape and unboxes the result, so under `jax.set_mesh` a
  3-name logical constraint hits a 2-D array and init fails. Here the kernels are created at
  their true shapes, with flax's layout (query/key/value/out kernels and biases, flattened into
  names like `query_kernel`), so weights convert one to one; the attention is `nn.dot_product_attention`.
  `inputs_kv` (keys and values from other tokens than the queries) serves the attention-pooling head.
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, train: bool = False,
               inputs_kv: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    kv = x if inputs_kv is None else inputs_kv.astype(self.dtype)
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
    head_dim = width // self.num_heads
    qkv_init = nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv"))
    qkv_bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv"))

    def project(name: str, inputs: jax.Array) -> jax.Array:
      kernel = self.param(f"{name}_kernel", qkv_init, (width, self.num_heads, head_dim), jnp.float32)
      bias = self.param(f"{name}_bias", qkv_bias_init, (self.num_heads, head_dim), jnp.float32)
      y = jnp.einsum("ble,ehk->blhk", inputs, kernel.astype(self.dtype)) + bias.astype(self.dtype)
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    q, k, v = project("query", x), project("key", kv), project("value", kv)
    use_dropout = train and self.dropout > 0.0
    y = nn.dot_product_attention(
        q, k, v, mask=mask, dropout_rate=self.dropout, deterministic=not use_dropout,
        dropout_rng=self.make_rng("dropout") if use_dropout else None, force_fp32_for_softmax=True,
        qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=_weights_times_values)
    out_kernel = self.param(
        "out_kernel",
        nn.with_logical_partitioning(nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
                                     ("heads", "kv", "embed")),
        (self.num_heads, head_dim, width), jnp.float32)
    out_bias = self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                          (width,), jnp.float32)
    return jnp.einsum("blhk,hke->ble", y, out_kernel.astype(self.dtype)) + out_bias.astype(self.dtype)


class TransformerBlock(nn.Module):
  """Pre-LN block: x + SelfAttention(LN(x)), then x + MLP(LN(x)). Shared by the image and text towers.

  `mask` is a [B, 1, L, L] boolean attention mask (True = may attend), or None for images.
  `train` may be passed positionally: `transformer_block(remat)` needs it so (a static argument).
  The checkpoint families differ only in `layer_norm_eps`, `act` and DINOv2's `layer_scale` (a learned
  per-channel factor on each branch, `ls_attn` / `ls_mlp`); the defaults are our own block.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  act: str = "gelu_tanh"
  layer_scale: bool = False

  def _scaled(self, y: jax.Array, name: str) -> jax.Array:
    if not self.layer_scale:
      return y
    scale = self.param(name, nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                       (y.shape[-1],), jnp.float32)
    return y * scale.astype(y.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    eps = self.layer_norm_eps
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    y = partitioned_layer_norm(name="ln_attn", dtype=self.dtype, epsilon=eps)(x)
    y = SelfAttention(self.num_heads, self.dropout, self.dtype, name="attn")(y, mask, train=train)
    y = nn.Dropout(self.dropout)(self._scaled(y, "ls_attn"), deterministic=not train)
    x = nn.with_logical_constraint(x + y, TOKEN_AXES)
    y = partitioned_layer_norm(name="ln_mlp", dtype=self.dtype, epsilon=eps)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.act, name="mlp")(y, train=train)
    y = nn.Dropout(self.dropout)(self._scaled(y, "ls_mlp"), deterministic=not train)
    return nn.with_logical_constraint(x + y, TOKEN_AXES)


def transformer_block(remat: str = "none") -> type[nn.Module]:
  """TransformerBlock, or its rematerialised twin; call it as `block(x, mask, train)`, all positional."""
  return accelerator.maybe_remat(TransformerBlock, remat, static_argnums=(3,))  # (self, x, mask, train)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """f32[B, H, W, C] -> f32[B, (H/p)*(W/p), p*p*C], row-major over the patch grid."""
  b, h, w, c = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch_size}; "
                     f"resize in the preprocessing (e.g. resize({h - h % patch_size})) or change model.patch_size")
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, patch_size * patch_size * c)


class AttentionPool(nn.Module):
  """SigLIP's multihead attention pooling ('map'): a learned probe attends to the tokens, then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  act: str = "gelu_tanh"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    width = tokens.shape[-1]
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                       (width,), jnp.float32)
    query = jnp.broadcast_to(probe.astype(self.dtype), (tokens.shape[0], 1, width))
    y = SelfAttention(self.num_heads, 0.0, self.dtype, name="attn")(query, inputs_kv=tokens)
    z = partitioned_layer_norm(name="ln", dtype=self.dtype, epsilon=self.layer_norm_eps)(y)
    return (y + MlpBlock(self.mlp_dim, 0.0, self.dtype, self.act, name="mlp")(z))[:, 0]


class ViTEncoder(nn.Module):
  """Images f32[B, H, W, 3] in [-1, 1] -> (tokens f32[B, N, width], pooled f32[B, width]).

  N = (H/p)*(W/p), plus one when pool='cls' (the class token is then tokens[:, 0]). Position
  embeddings are learned for one image size; a different size at apply time fails on the shape.
  `dtype` is the compute dtype (outputs are float32 whatever it is); `remat` 'none' | 'blocks'.

  The fields after `remat` describe the public checkpoints' ViTs (CLIP, SigLIP, DINOv2;
  `models/checkpoint_towers.py` sets them from a checkpoint's config.json); their defaults are ours.
  `input_mean` / `input_std` (per channel, on [0, 1] pixels): the checkpoint's own normalisation,
  applied to the [-1, 1] input every image tower receives (empty: the input as is). `pool='map'` is
  SigLIP's attention pooling. `trainable_from=k` stops the gradient behind block k-1, so the stem and
  blocks 0..k-1 get none (`model.image_trainable_from`; the values are unchanged).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  pool: str = "mean"
  dtype: Any = jnp.float32
  remat: str = "none"
  layer_norm_eps: float = 1e-6
  act: str = "gelu_tanh"
  layer_scale: bool = False  # DINOv2
  patch_bias: bool = True  # CLIP's patch embedding has none
  cls_pos: bool = False  # CLIP, DINOv2: the class token has a position too (pos_embed [1 + N, width])
  ln_pre: bool = False  # CLIP: a LayerNorm before the blocks
  proj_dim: int = 0  # > 0: pooled through a bias-free Dense (CLIP's visual_projection)
  input_mean: tuple[float, ...] = ()
  input_std: tuple[float, ...] = ()
  trainable_from: int = 0

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    if self.pool not in ("mean", "cls", "map"):
      raise ValueError(f"ViTEncoder.pool={self.pool!r} is not supported; use 'mean', 'cls' or 'map'")
    if not 0 <= self.trainable_from <= self.depth:
      raise ValueError(f"config.model.image_trainable_from={self.trainable_from} must lie in 0..{self.depth} "
                       f"(the ViT's blocks)")
    eps, dtype = self.layer_norm_eps, self.dtype
    if self.input_mean:
      mean, std = jnp.asarray(self.input_mean, jnp.float32), jnp.asarray(self.input_std, jnp.float32)
      images = ((images.astype(jnp.float32) + 1.0) / 2.0 - mean) / std
    patches = nn.with_logical_constraint(patchify(images, self.patch_size), ("batch", "length", "patch"))
    x = partitioned_dense(self.width, ("patch", "embed"), name="patch_embed", dtype=dtype,
                          use_bias=self.patch_bias)(patches)
    with_cls = self.pool == "cls" or self.cls_pos
    pos_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed"))
    if not self.cls_pos:
      x = x + self.param("pos_embed", pos_init, x.shape[1:], jnp.float32)[None].astype(dtype)
    if with_cls:
      cls = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                       (self.width,), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, self.width)), x], axis=1)
    if self.cls_pos:
      x = x + self.param("pos_embed", pos_init, x.shape[1:], jnp.float32)[None].astype(dtype)
    if self.ln_pre:
      x = partitioned_layer_norm(name="ln_pre", dtype=dtype, epsilon=eps)(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    block = transformer_block(self.remat)
    for i in range(self.depth):
      if i and i == self.trainable_from:
        x = jax.lax.stop_gradient(x)
      x = block(self.num_heads, self.mlp_dim, self.dropout, dtype, eps, self.act, self.layer_scale,
                name=f"block{i}")(x, None, train)
    if self.trainable_from == self.depth:
      x = jax.lax.stop_gradient(x)
    x = partitioned_layer_norm(name="ln_final", dtype=dtype, epsilon=eps)(x).astype(jnp.float32)
    tokens = nn.with_logical_constraint(x, TOKEN_AXES)
    if self.pool == "map":
      pooled = AttentionPool(self.num_heads, self.mlp_dim, eps, self.act, dtype, name="map_head")(tokens)
    else:
      pooled = pool_tokens(tokens, self.pool)
    if self.proj_dim:
      pooled = partitioned_dense(self.proj_dim, ("embed", "proj"), name="proj", dtype=dtype, use_bias=False)(pooled)
    pooled = nn.with_logical_constraint(pooled.astype(jnp.float32), POOLED_AXES)
    return tokens, pooled


def vit_sizes(spec: Any) -> dict[str, int]:
  """A preset name ('mu') or explicit sizes (mapping or 4-sequence) -> ViTEncoder size kwargs."""
  keys = ("width", "depth", "num_heads", "mlp_dim")
  if isinstance(spec, str):
    if spec not in VIT_PRESETS:
      raise ValueError(f"model.vit={spec!r} is not a ViT preset; use one of {sorted(VIT_PRESETS)} "
                       f"or explicit sizes {{width, depth, num_heads, mlp_dim}}")
    return dict(zip(keys, VIT_PRESETS[spec]))
  if isinstance(spec, Sequence):
    return dict(zip(keys, (int(v) for v in spec), strict=True))
  missing = [k for k in keys if k not in spec]
  if missing:
    raise ValueError(f"model.vit sizes lack {missing}; give all of {keys} or a preset {sorted(VIT_PRESETS)}")
  return {k: int(spec[k]) for k in keys}
