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


class TextEncoder(nn.Module):
  """tokens int32[B, L] -> (tokens f32[B, L, width], pooled f32[B, width], mask bool[B, L]).

  `mask` is True on non-pad tokens. Padding never influences real tokens (attention keys are
  masked) nor the 'mean' pool. An all-padding row still yields finite outputs (zeros when pooled
  by mean); the fusion decides separately whether a title is present.
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

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    if tokens.ndim != 2:
      raise ValueError(f"TextEncoder expects int32[B, L] title tokens, got shape {tokens.shape}")
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"titles have {length} tokens but the text tower holds max_len={self.max_len}; "
                       f"set config.data.max_title_len <= {self.max_len} or rebuild the model")
    mask = tokens != PAD_ID
    x = nn.Embed(
        self.vocab_size, self.width,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        dtype=self.dtype, param_dtype=jnp.float32, name="token_embed")(tokens)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                     (self.max_len, self.width), jnp.float32)
    x = x + pos[None, :length].astype(self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    attention_mask = nn.make_attention_mask(mask, mask)
    block = vit.transformer_block(self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.dropout, self.dtype, name=f"block{i}")(x, attention_mask, train)
    x = vit.partitioned_layer_norm(name="ln_final", dtype=self.dtype)(x).astype(jnp.float32)
    x = nn.with_logical_constraint(x, vit.TOKEN_AXES)
    pooled = nn.with_logical_constraint(vit.pool_tokens(x, self.pool, mask), vit.POOLED_AXES)
    return x, pooled, mask
