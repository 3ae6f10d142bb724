"""The title tower: a small BERT-style encoder over WordPiece ids padded with 0.

Titles are short ([CLS] pieces [SEP] [PAD]...), so a few pre-LN blocks suffice; the same
`TransformerBlock` as the image tower keeps one implementation (and one set of logical names) for
both. A pretrained MiniLM can later register beside it with the same output contract.
`dtype` (compute; parameters stay float32, outputs are float32) and `remat` as in `vit.ViTEncoder`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oclear_jax.models import vit

PAD_ID = 0


TEXT_POOLS = ("mean", "cls", "eos", "last")


class TextEncoder(nn.Module):
  """tokens int32[B, L] -> (tokens f32[B, L, width], pooled f32[B, width], mask bool[B, L]).

  `mask` is True on non-pad tokens. Padding never influences real tokens (attention keys are
  masked) nor the 'mean' pool. An all-padding row still yields finite outputs (zeros when pooled
  by mean); the fusion decides separately whether a title is present.

  The fields after `remat` describe the public checkpoints' text towers (CLIP, SigLIP;
  `models/checkpoint_towers.py` sets them from a config.json); their defaults are ours. Titles then
  arrive as the checkpoint tokenizer's ids plus `id_offset` (1: so that 0 stays our padding, which
  is a real token in those vocabularies); the tower subtracts it and writes `pad_token_id` at the
  padding. CLIP: `causal` attention and pool 'eos' (the first `eos_token_id`). SigLIP: the title
  padded to all `max_len` positions, padding attended to (`attend_padding`, as it was trained), and
  pool 'last'. `proj_dim` > 0: the pooled vector through a Dense into the joint image-text space
  (CLIP's text_projection, bias-free; SigLIP's head, with bias: `proj_bias`).
  """
  vocab_size: int
  max_len: int
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
  causal: bool = False
  attend_padding: bool = False
  id_offset: int = 0
  pad_token_id: int = PAD_ID
  eos_token_id: int = -1
  proj_dim: int = 0
  proj_bias: bool = False

  def _checkpoint_ids(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    ids = jnp.where(mask, tokens - self.id_offset, self.pad_token_id)
    if self.attend_padding:  # every position, as the checkpoint saw its fixed-length titles
      ids = jnp.pad(ids, ((0, 0), (0, self.max_len - ids.shape[1])), constant_values=self.pad_token_id)
    return ids

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    if tokens.ndim != 2:
      raise ValueError(f"TextEncoder expects int32[B, L] title tokens, got shape {tokens.shape}")
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"titles have {length} tokens but the text tower holds max_len={self.max_len}; "
                       f"set config.data.max_title_len <= {self.max_len} or rebuild the model")
    if self.pool not in TEXT_POOLS:
      raise ValueError(f"TextEncoder.pool={self.pool!r} is not supported; use one of {TEXT_POOLS}")
    mask = tokens != PAD_ID
    ids = self._checkpoint_ids(tokens, mask)
    x = nn.Embed(
        self.vocab_size, self.width,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        dtype=self.dtype, param_dtype=jnp.float32, name="token_embed")(ids)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                     (self.max_len, self.width), jnp.float32)
    x = x + pos[None, :ids.shape[1]].astype(self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    attention_mask = None if self.attend_padding else nn.make_attention_mask(mask, mask)
    if self.causal:
      attention_mask = nn.combine_masks(attention_mask, nn.make_causal_mask(ids))
    block = vit.transformer_block(self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.layer_norm_eps, self.act,
                name=f"block{i}")(x, attention_mask, train)
    x = vit.partitioned_layer_norm(name="ln_final", dtype=self.dtype, epsilon=self.layer_norm_eps)(x)
    x = nn.with_logical_constraint(x.astype(jnp.float32), vit.TOKEN_AXES)
    if self.pool == "eos":
      pooled = jnp.take_along_axis(x, jnp.argmax(ids == self.eos_token_id, axis=1)[:, None, None], axis=1)[:, 0]
    elif self.pool == "last":
      pooled = x[:, -1]
    else:
      pooled = vit.pool_tokens(x, self.pool, mask)
    if self.proj_dim:
      pooled = vit.partitioned_dense(self.proj_dim, ("embed", "proj"), name="proj", dtype=self.dtype,
                                     use_bias=self.proj_bias)(pooled).astype(jnp.float32)
    pooled = nn.with_logical_constraint(pooled, vit.POOLED_AXES)
    return x[:, :length], pooled, mask
