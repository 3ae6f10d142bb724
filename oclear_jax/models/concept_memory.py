"""Concept-memory fusion: what a title says about a product, grounded in its catalogue image.

Documents carry an image and a title, queries only an image, and the two are not equally
informative: the image is always there and decides what a shopper photo matches, the title is
sometimes empty, sometimes boilerplate, sometimes decisive (brand, colour, the article type). The
fusion therefore keeps the image embedding as the backbone of the document embedding and adds a
title term through a learned, input-dependent gate:

  1. Read. K learned concept slots (an external memory, f32[K, D]) are the *queries* of a
     cross-attention over the title tokens, masked by padding. Each slot thus reads "its" aspect
     of the title (one may settle on colour words, another on the article type) into a concept
     vector; the slots, not the title length, fix the shape, so every title gives K concepts.
     A learned *null* key/value is always visible: a slot whose aspect the title does not
     mention attends there and reads nothing, instead of being forced to spread its softmax over
     unrelated words (and an all-padding row stays well defined).
  2. Ground. The concepts attend over the image's spatial tokens (text-to-image attention), so
     "red" or "sneaker" picks the image regions that show it. What comes back, f32[B, K, D] (plus
     an MLP), is *image evidence*: values of image tokens, selected by the title. The title's own
     content does not enter the embedding this way, only through the gate.
  3. Add through a gate. The grounded concepts are averaged and projected into the embedding
     space, then rescaled to the norm of the image embedding (delta); a per-dimension gate
     g = sigmoid(Dense([img_emb, title_summary, read_mass])) decides how much of it enters:
     doc = img_emb + g * delta. `title_summary` is the mean concept, `read_mass` (per slot,
     1 - attention on the null token) tells the gate how much the title actually said. The
     gate's bias starts negative (sigmoid(-2) = 0.12), so an untrained model is image-dominant.

Why the title steers but does not write (measured, benchmarks/fusion_ablation.py). A first version
added the concepts themselves (concept + grounded) with an unbounded delta, like `gated` does with
the pooled title. On class-disjoint evaluation that loses to the image-only path: on the training
classes a title names its class outright, so the model leans on text directions that mean nothing
for unseen classes, and an image-only query cannot follow them. Adding image evidence instead, and
bounding the title term (|g * delta| <= |img_emb|: the title can turn the document embedding by at
most 45 degrees), keeps the document image-dominant by construction and moved this fusion from
clearly below image_only to level with or above it (numbers in the benchmark's output).

An empty or missing title (nothing but [PAD]/[CLS]/[SEP]) multiplies the gate by zero and selects
`img_emb` with `jnp.where`, so it gives bit-exactly the image-only embedding; queries, whose titles
are empty, are untouched. The gate is sown into 'intermediates' (`title_gate`, f32[B, E], zero for
empty titles) for inspection and tests.

Attention widths: D = embed_dim; text tokens (384 wide for MiniLM) are projected by the key/value
kernels, image tokens (1280 for EfficientNet-Lite0) first by one shared Dense to D (`image_proj`),
so towers of any width plug in.
Parameters carry logical names only; the slot axis is 'concepts' (replicated unless a rule maps it).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from oclear_jax.models import vit

CONCEPT_AXES = ("batch", "concepts", "embed")
GATE_BIAS_INIT = -2.0


class CrossAttention(nn.Module):
  """queries f32[B, Q, Dq] attend over inputs f32[B, N, Dk] (mask bool[B, N]) -> (f32[B, Q, width], weights).

  Kernels are 3-D ('embed', 'heads', 'kv') as in `vit.SelfAttention`, created at their true
  shapes so logical partitioning works under a mesh. Weights f32[B, heads, Q, N] come back too
  (the fusion reads the null token's share from them).
  """
  num_heads: int
  width: int

  @nn.compact
  def __call__(self, queries: jax.Array, inputs: jax.Array,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    if self.width % self.num_heads:
      raise ValueError(f"concept width {self.width} is not divisible by model.concept_heads={self.num_heads}")
    head_dim = self.width // self.num_heads
    kernel_init = nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv"))
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv"))

    def project(name: str, x: jax.Array) -> jax.Array:
      kernel = self.param(f"{name}_kernel", kernel_init, (x.shape[-1], self.num_heads, head_dim), jnp.float32)
      bias = self.param(f"{name}_bias", bias_init, (self.num_heads, head_dim), jnp.float32)
      return nn.with_logical_constraint(jnp.einsum("bne,ehk->bnhk", x, kernel) + bias,
                                        ("batch", "length", "heads", "kv"))

    q, k, v = project("query", queries), project("key", inputs), project("value", inputs)
    attention_mask = None if mask is None else mask[:, None, None, :]
    weights = nn.dot_product_attention_weights(q, k, mask=attention_mask)  # [B, H, Q, N]
    y = jnp.einsum("bhqn,bnhk->bqhk", weights, v)
    out_kernel = self.param(
        "out_kernel",
        nn.with_logical_partitioning(nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
                                     ("heads", "kv", "embed")),
        (self.num_heads, head_dim, self.width), jnp.float32)
    out_bias = self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                          (self.width,), jnp.float32)
    return jnp.einsum("bqhk,hke->bqe", y, out_kernel) + out_bias, weights


def _layer_norm(name: str) -> nn.LayerNorm:
  return vit.partitioned_layer_norm(name=name)


class ConceptMemoryFusion(nn.Module):
  """(img_emb f32[B, E], image_tokens f32[B, N, Wi], title tokens f32[B, L, Wt], mask bool[B, L],
  present bool[B]) -> f32[B, E]; see the module docstring."""
  num_slots: int = 16
  num_heads: int = 4

  @nn.compact
  def __call__(self, img_emb: jax.Array, image_tokens: jax.Array, text_tokens: jax.Array, text_mask: jax.Array,
               present: jax.Array) -> jax.Array:
    if self.num_slots <= 0:
      raise ValueError(f"model.concept_slots={self.num_slots} must be positive for fusion='concept_attention'")
    if image_tokens is None or image_tokens.ndim != 3:
      raise ValueError("fusion='concept_attention' needs the image tower's spatial tokens f32[B, N, W]; "
                       f"got {None if image_tokens is None else image_tokens.shape}")
    batch, embed_dim = img_emb.shape
    width = embed_dim

    # 1. Read: the slots query the title tokens (plus an always-visible null token).
    slots = self.param("slots", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("concepts", "embed")),
                       (self.num_slots, width), jnp.float32)
    text = _layer_norm("ln_text")(text_tokens.astype(jnp.float32))
    null = self.param("null_token", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                      (text.shape[-1],), jnp.float32)
    text = jnp.concatenate([jnp.broadcast_to(null, (batch, 1, text.shape[-1])), text], axis=1)
    mask = jnp.concatenate([jnp.ones((batch, 1), bool), text_mask.astype(bool)], axis=1)
    queries = jnp.broadcast_to(_layer_norm("ln_slots")(slots), (batch, self.num_slots, width))
    read, read_weights = CrossAttention(self.num_heads, width, name="read")(queries, text, mask)
    concepts = nn.with_logical_constraint(slots[None] + read, CONCEPT_AXES)
    read_mass = 1.0 - read_weights[..., 0].mean(axis=1)  # [B, K]: how much each slot found in the title

    # 2. Ground: the concepts attend over the image's spatial tokens. What comes back is image
    # evidence (values of image tokens); the title only decides where to look.
    # One shared projection to D before the key/value kernels: EfficientNet tokens are 1280 wide, and
    # this halves the FLOPs of projecting them twice (keys and values) at full width.
    image = vit.partitioned_dense(width, ("embed", "proj"), name="image_proj")(
        _layer_norm("ln_image")(image_tokens.astype(jnp.float32)))
    grounded, _ = CrossAttention(self.num_heads, width, name="ground")(_layer_norm("ln_concepts")(concepts), image)
    z = nn.with_logical_constraint(grounded, CONCEPT_AXES)
    z = z + vit.MlpBlock(2 * width, name="mlp")(_layer_norm("ln_mlp")(z))

    # 3. Pool, project to the image embedding's norm, gate.
    delta = vit.partitioned_dense(embed_dim, ("embed", "proj"), name="delta")(
        _layer_norm("ln_summary")(z.mean(axis=1)))
    img_norm = jnp.sqrt(jnp.maximum(jnp.sum(img_emb * img_emb, axis=-1, keepdims=True), 1e-12))
    delta = delta * img_norm * jax.lax.rsqrt(jnp.maximum(jnp.sum(delta * delta, axis=-1, keepdims=True), 1e-12))
    title_summary = _layer_norm("ln_title")(concepts.mean(axis=1))
    gate_in = jnp.concatenate([img_emb, title_summary, read_mass], axis=-1)
    gate = nn.sigmoid(nn.Dense(
        embed_dim, kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "proj")),
        bias_init=nn.with_logical_partitioning(nn.initializers.constant(GATE_BIAS_INIT), ("proj",)),
        name="gate")(gate_in))
    gate = gate * present[:, None].astype(gate.dtype)
    self.sow("intermediates", "title_gate", gate)
    fused = jnp.where(present[:, None], img_emb + gate * delta, img_emb)
    return nn.with_logical_constraint(fused, ("batch", "proj"))
