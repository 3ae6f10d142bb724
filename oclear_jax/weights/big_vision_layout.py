"""big_vision SigLIP `.npz` paths -> our tower's parameter paths (the `img/` and `txt/` trees).

big_vision is Flax too, so kernels keep their layout: attention kernels are already
[embed, heads, head_dim], the patch convolution [p, p, C, D] flattens row-major to `vit.patchify`'s
(row, col, channel) order. Position embeddings carry a leading batch axis of 1 and the MAP probe
[1, 1, D] two; `t` and `b` (the sigmoid loss's temperature and bias) are read by no tower.
"""
from __future__ import annotations

import numpy as np

from oclear_jax.weights.hf_layout import Rule, same

UNUSED = ("t", "b")
OTHER_TOWER = {"image": ("txt/",), "text": ("img/",)}


def _flat_last(w: np.ndarray) -> np.ndarray:
  return w.reshape(-1, w.shape[-1])


def _dense(prefix: str, path: tuple[str, ...]) -> dict[str, Rule]:
  return {f"{prefix}/kernel": (path + ("kernel",), same), f"{prefix}/bias": (path + ("bias",), same)}


def _attention(prefix: str, path: tuple[str, ...]) -> dict[str, Rule]:
  rules = {}
  for part in ("query", "key", "value", "out"):
    rules[f"{prefix}/{part}/kernel"] = (path + (f"{part}_kernel",), same)
    rules[f"{prefix}/{part}/bias"] = (path + (f"{part}_bias",), same)
  return rules


def _layer_norm(prefix: str, path: tuple[str, ...]) -> dict[str, Rule]:
  return {f"{prefix}/scale": (path + ("scale",), same), f"{prefix}/bias": (path + ("bias",), same)}


def _block(prefix: str, block: tuple[str, ...]) -> dict[str, Rule]:
  return {**_layer_norm(f"{prefix}/LayerNorm_0", block + ("ln_attn",)),
          **_attention(f"{prefix}/MultiHeadDotProductAttention_0", block + ("attn",)),
          **_layer_norm(f"{prefix}/LayerNorm_1", block + ("ln_mlp",)),
          **_dense(f"{prefix}/MlpBlock_0/Dense_0", block + ("mlp", "fc1")),
          **_dense(f"{prefix}/MlpBlock_0/Dense_1", block + ("mlp", "fc2"))}


def rules(side: str, depth: int, map_head: bool = True) -> dict[str, Rule]:
  """npz path (no 'params/') -> (our path under the tower, transform)."""
  if side == "image":
    out = {"img/embedding/kernel": (("patch_embed", "kernel"), _flat_last),
           "img/embedding/bias": (("patch_embed", "bias"), same),
           "img/pos_embedding": (("pos_embed",), lambda w: w.reshape(w.shape[-2:])),
           **_layer_norm("img/Transformer/encoder_norm", ("ln_final",))}
    for i in range(depth):
      out.update(_block(f"img/Transformer/encoderblock_{i}", (f"block{i}",)))
    if map_head:
      m = ("map_head",)
      out["img/MAPHead_0/probe"] = (m + ("probe",), lambda w: w.reshape(-1))
      out.update(_attention("img/MAPHead_0/MultiHeadDotProductAttention_0", m + ("attn",)))
      out.update(_layer_norm("img/MAPHead_0/LayerNorm_0", m + ("ln",)))
      out.update(_dense("img/MAPHead_0/MlpBlock_0/Dense_0", m + ("mlp", "fc1")))
      out.update(_dense("img/MAPHead_0/MlpBlock_0/Dense_1", m + ("mlp", "fc2")))
    return out
  out = {"txt/Embed_0/embedding": (("token_embed", "embedding"), same),
         "txt/pos_embedding": (("pos_embed",), lambda w: w.reshape(w.shape[-2:])),
         **_layer_norm("txt/Encoder_0/encoder_norm", ("ln_final",)), **_dense("txt/head", ("proj",))}
  for i in range(depth):
    out.update(_block(f"txt/Encoder_0/encoderblock_{i}", (f"block{i}",)))
  return out
