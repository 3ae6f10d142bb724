"""Hugging Face tensor names -> our tower's parameter paths, for CLIP, SigLIP and DINOv2 (vision and text).

Each rule maps one file tensor to one parameter with the transform between PyTorch's layout and
ours: Linear weights [out, in] transpose to kernels [in, out]; attention projections split their
output axis into (heads, head_dim), as `vit.SelfAttention` holds them; the patch convolution
[D, C, p, p] becomes the Dense kernel over `vit.patchify`'s (row, col, channel) patch order;
SigLIP's pooling head packs q, k, v in one `in_proj`, split here. Position embeddings are resized
to the tower's grid by `checkpoint_params` (they are the only parameter whose shape the data sets).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Rule = tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]

# Buffers and training-only tensors a file may hold that no forward pass reads: consumed, not used.
UNUSED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids",
          "embeddings.mask_token",  # DINOv2's masked-image-modelling token
          "logit_scale", "logit_bias")  # the contrastive loss's temperature and bias
# A joint checkpoint's tensors that belong to the other tower.
OTHER_TOWER = {"image": ("text_model.", "text_projection."), "text": ("vision_model.", "visual_projection.")}


# Transforms use array methods only, so they also run on shapes (`jax.eval_shape`, the full-size tests).
def linear_t(w: np.ndarray) -> np.ndarray:
  return w.T


def same(w: np.ndarray) -> np.ndarray:
  return w


def _heads_kernel(heads: int) -> Callable[[np.ndarray], np.ndarray]:
  return lambda w: w.T.reshape(w.shape[1], heads, w.shape[0] // heads)


def _heads_bias(heads: int) -> Callable[[np.ndarray], np.ndarray]:
  return lambda b: b.reshape(heads, b.shape[0] // heads)


def _out_kernel(heads: int) -> Callable[[np.ndarray], np.ndarray]:
  return lambda w: w.T.reshape(heads, w.shape[1] // heads, w.shape[0])


def _layer_norm(prefix: str, path: tuple[str, ...]) -> dict[str, Rule]:
  return {f"{prefix}.weight": (path + ("scale",), same), f"{prefix}.bias": (path + ("bias",), same)}


def _linear(prefix: str, path: tuple[str, ...], bias: bool = True) -> dict[str, Rule]:
  rules = {f"{prefix}.weight": (path + ("kernel",), linear_t)}
  if bias:
    rules[f"{prefix}.bias"] = (path + ("bias",), same)
  return rules


def attention(names: dict[str, str], path: tuple[str, ...], heads: int) -> dict[str, Rule]:
  """`names`: our 'query', 'key', 'value', 'out' -> the file's module prefix of each."""
  rules = {}
  for ours in ("query", "key", "value"):
    rules[f"{names[ours]}.weight"] = (path + (f"{ours}_kernel",), _heads_kernel(heads))
    rules[f"{names[ours]}.bias"] = (path + (f"{ours}_bias",), _heads_bias(heads))
  rules[f"{names['out']}.weight"] = (path + ("out_kernel",), _out_kernel(heads))
  rules[f"{names['out']}.bias"] = (path + ("out_bias",), same)
  return rules


def _clip_siglip_layer(prefix: str, block: tuple[str, ...], heads: int) -> dict[str, Rule]:
  names = {"query": f"{prefix}.self_attn.q_proj", "key": f"{prefix}.self_attn.k_proj",
           "value": f"{prefix}.self_attn.v_proj", "out": f"{prefix}.self_attn.out_proj"}
  return {**_layer_norm(f"{prefix}.layer_norm1", block + ("ln_attn",)),
          **attention(names, block + ("attn",), heads),
          **_layer_norm(f"{prefix}.layer_norm2", block + ("ln_mlp",)),
          **_linear(f"{prefix}.mlp.fc1", block + ("mlp", "fc1")), **_linear(f"{prefix}.mlp.fc2", block + ("mlp", "fc2"))}


def _dinov2_layer(prefix: str, block: tuple[str, ...], heads: int) -> dict[str, Rule]:
  names = {k: f"{prefix}.attention.attention.{k}" for k in ("query", "key", "value")}
  names["out"] = f"{prefix}.attention.output.dense"
  return {**_layer_norm(f"{prefix}.norm1", block + ("ln_attn",)), **attention(names, block + ("attn",), heads),
          f"{prefix}.layer_scale1.lambda1": (block + ("ls_attn",), same),
          **_layer_norm(f"{prefix}.norm2", block + ("ln_mlp",)),
          **_linear(f"{prefix}.mlp.fc1", block + ("mlp", "fc1")), **_linear(f"{prefix}.mlp.fc2", block + ("mlp", "fc2")),
          f"{prefix}.layer_scale2.lambda1": (block + ("ls_mlp",), same)}


def patch_kernel(w: np.ndarray) -> np.ndarray:
  """Conv weight [D, C, p, p] -> Dense kernel [p*p*C, D] over (row, col, channel) patches."""
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _split_in_proj(part: int, kind: str, heads: int) -> Callable[[np.ndarray], np.ndarray]:
  def take(w: np.ndarray) -> np.ndarray:
    if w.shape[0] % 3:
      raise ValueError(f"in_proj of shape {w.shape} does not split in q, k, v")
    n = w.shape[0] // 3
    chunk = w[part * n:(part + 1) * n]
    return _heads_kernel(heads)(chunk) if kind == "kernel" else _heads_bias(heads)(chunk)
  return take


def image_rules(family: str, depth: int, heads: int, proj: bool, map_head: bool = True) -> dict[str, Rule]:
  """file tensor name -> (our path under the image tower, transform)."""
  if family == "dinov2":
    rules = {"embeddings.cls_token": (("cls_token",), lambda w: w.reshape(-1)),
             "embeddings.position_embeddings": (("pos_embed",), lambda w: w.reshape(w.shape[-2:])),
             "embeddings.patch_embeddings.projection.weight": (("patch_embed", "kernel"), patch_kernel),
             "embeddings.patch_embeddings.projection.bias": (("patch_embed", "bias"), same),
             **_layer_norm("layernorm", ("ln_final",))}
    for i in range(depth):
      rules.update(_dinov2_layer(f"encoder.layer.{i}", (f"block{i}",), heads))
    return rules
  p = "vision_model."
  rules = {f"{p}embeddings.patch_embedding.weight": (("patch_embed", "kernel"), patch_kernel),
           f"{p}embeddings.position_embedding.weight": (("pos_embed",), same),
           **_layer_norm(f"{p}post_layernorm", ("ln_final",))}
  for i in range(depth):
    rules.update(_clip_siglip_layer(f"{p}encoder.layers.{i}", (f"block{i}",), heads))
  if family == "clip":
    rules[f"{p}embeddings.class_embedding"] = (("cls_token",), same)
    rules.update(_layer_norm(f"{p}pre_layrnorm", ("ln_pre",)))
    if proj:
      rules.update(_linear("visual_projection", ("proj",), bias=False))
    return rules
  rules[f"{p}embeddings.patch_embedding.bias"] = (("patch_embed", "bias"), same)
  if not map_head:
    return rules
  h, m = f"{p}head", ("map_head",)
  rules[f"{h}.probe"] = (m + ("probe",), lambda w: w.reshape(-1))
  for part, ours in enumerate(("query", "key", "value")):
    rules[f"{h}.attention.in_proj_weight" + "#" + ours] = (m + ("attn", f"{ours}_kernel"),
                                                           _split_in_proj(part, "kernel", heads))
    rules[f"{h}.attention.in_proj_bias" + "#" + ours] = (m + ("attn", f"{ours}_bias"),
                                                         _split_in_proj(part, "bias", heads))
  rules[f"{h}.attention.out_proj.weight"] = (m + ("attn", "out_kernel"), _out_kernel(heads))
  rules[f"{h}.attention.out_proj.bias"] = (m + ("attn", "out_bias"), same)
  rules.update(_layer_norm(f"{h}.layernorm", m + ("ln",)))
  rules.update(_linear(f"{h}.mlp.fc1", m + ("mlp", "fc1")))
  rules.update(_linear(f"{h}.mlp.fc2", m + ("mlp", "fc2")))
  return rules


def text_rules(family: str, depth: int, heads: int, proj: bool) -> dict[str, Rule]:
  p = "text_model."
  rules = {f"{p}embeddings.token_embedding.weight": (("token_embed", "embedding"), same),
           f"{p}embeddings.position_embedding.weight": (("pos_embed",), same),
           **_layer_norm(f"{p}final_layer_norm", ("ln_final",))}
  for i in range(depth):
    rules.update(_clip_siglip_layer(f"{p}encoder.layers.{i}", (f"block{i}",), heads))
  if family == "clip" and proj:
    rules.update(_linear("text_projection", ("proj",), bias=False))
  elif family == "siglip":
    rules.update(_linear(f"{p}head", ("proj",)))
  return rules
