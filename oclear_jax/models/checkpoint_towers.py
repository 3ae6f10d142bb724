"""Towers from checkpoints a researcher brings: `model.image_tower` / `model.text_tower` = 'hf:FOLDER' or
'big_vision:FILE.npz' build our own `vit.ViTEncoder` / `text.TextEncoder` with the checkpoint's architecture.

The architecture is read, never assumed: a Hugging Face folder's config.json through `transformers`'
config classes (CLIP and its vision / text models, SigLIP likewise, DINOv2), its preprocessor_config.json
for the image normalisation, its tokenizer for the text tower's pad and end ids; a big_vision SigLIP
`.npz` from its parameter shapes (big_vision keeps no config beside them). The weights are read
separately, into the parameters of the tower built here (`oclear_jax/weights/checkpoint_params.py`).

Families (the fields of `ViTEncoder` / `TextEncoder` they set):
  CLIP image: class token with a position, LayerNorm before the blocks, quick GELU, LN eps 1e-5, no
    patch bias, pooled = the class token, then `visual_projection` where the file has it (CLIPModel,
    CLIPVisionModelWithProjection): the joint image-text space.
  CLIP text: causal attention, pooled at the first end token, then `text_projection` where present.
  SigLIP image: no class token, attention pooling ('map'); tanh GELU; eps 1e-6; [-1, 1] input.
  SigLIP text: titles padded to the 64 positions and attended to as trained; pooled = last position,
    then the `head` Dense (the joint space).
  DINOv2 image: class token with a position, LayerScale, exact GELU; pooled = the class token.
SigLIP 2 (NaFlex patches) and DINOv2 with registers or SwiGLU are refused by name.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import flax.linen as nn

from oclear_jax.models import oclear
from oclear_jax.models import text as text_lib
from oclear_jax.models import vit
from input_pipeline import checkpoint_folder

HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "gelu": "gelu"}
HF_IMAGE = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip",
            "dinov2": "dinov2"}
HF_TEXT = {"clip": "clip", "clip_text_model": "clip", "siglip": "siglip", "siglip_text_model": "siglip"}
BIG_VISION_PAD_ID = 1  # big_vision's SigLIP text preprocessing pads with 1 (its SentencePiece </s>)
SIDES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class TowerArch:
  """What a checkpoint says about one of its towers."""
  scheme: str  # 'hf' | 'big_vision'
  family: str  # 'clip' | 'siglip' | 'dinov2'
  side: str  # 'image' | 'text'
  path: pathlib.Path  # local folder (hf) or .npz file (big_vision)
  kwargs: tuple[tuple[str, Any], ...]  # ViTEncoder / TextEncoder fields
  image_size: int = 0  # the image tower's training resolution in whole patches (its position grid)

  @property
  def fields(self) -> dict[str, Any]:
    return dict(self.kwargs)


def _activation(name: str, where: str) -> str:
  if name not in HF_ACTIVATIONS:
    raise ValueError(f"{where}: hidden_act={name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
  return HF_ACTIVATIONS[name]


def _sub_config(config: Any, side: str, table: dict[str, str], folder: pathlib.Path) -> tuple[str, Any]:
  model_type = config.model_type
  if model_type not in table:
    other = HF_TEXT if side == "image" else HF_IMAGE
    if model_type in other:
      raise ValueError(f"{folder} holds a {model_type} checkpoint, which has no {side} tower; point "
                       f"config.model.{side}_tower at a checkpoint with one")
    raise ValueError(f"{folder}: model_type={model_type!r} is not a supported {side} tower; supported: "
                     f"{sorted(table)} (SigLIP 2 and DINOv2 with registers are not yet)")
  if model_type not in ("clip", "siglip"):
    return table[model_type], config
  return table[model_type], (config.vision_config if side == "image" else config.text_config)


def _hf_image(folder: pathlib.Path) -> TowerArch:
  config = checkpoint_folder.hf_config(folder)
  family, v = _sub_config(config, "image", HF_IMAGE, folder)
  names = set(checkpoint_folder.safetensors_names(folder))
  mean, std = checkpoint_folder.image_normalisation(folder)
  mlp_dim = int(v.hidden_size * v.mlp_ratio) if family == "dinov2" else v.intermediate_size
  kw = dict(patch_size=v.patch_size, width=v.hidden_size, depth=v.num_hidden_layers,
            num_heads=v.num_attention_heads, mlp_dim=mlp_dim, layer_norm_eps=float(v.layer_norm_eps),
            act=_activation(v.hidden_act, str(folder)))
  if (mean, std) != ((0.5,) * 3, (0.5,) * 3):  # (x01 - 0.5) / 0.5 is the [-1, 1] input itself
    kw.update(input_mean=mean, input_std=std)
  if v.num_channels != 3:
    raise ValueError(f"{folder}: num_channels={v.num_channels}; image towers read RGB")
  if family == "clip":
    kw.update(pool="cls", patch_bias=False, cls_pos=True, ln_pre=True,
              proj_dim=config.projection_dim if "visual_projection.weight" in names else 0)
  elif family == "siglip":
    kw.update(pool="map" if getattr(v, "vision_use_head", True) else "mean")
  else:
    if getattr(v, "use_swiglu_ffn", False) or not getattr(v, "qkv_bias", True):
      raise ValueError(f"{folder}: DINOv2 with SwiGLU or without qkv bias (ViT-g) is not supported")
    kw.update(pool="cls", cls_pos=True, layer_scale=True)
  # A strided patch convolution drops the pixels past the last whole patch (So400m/14 at 384 px reads 378).
  return TowerArch("hf", family, "image", folder, tuple(kw.items()),
                   image_size=int(v.image_size) // v.patch_size * v.patch_size)


def _hf_text(folder: pathlib.Path) -> TowerArch:
  config = checkpoint_folder.hf_config(folder)
  family, t = _sub_config(config, "text", HF_TEXT, folder)
  names = set(checkpoint_folder.safetensors_names(folder))
  tokenizer = checkpoint_folder.hf_tokenizer(folder)
  kw = dict(vocab_size=t.vocab_size, max_len=t.max_position_embeddings, width=t.hidden_size,
            depth=t.num_hidden_layers, num_heads=t.num_attention_heads, mlp_dim=t.intermediate_size,
            layer_norm_eps=float(t.layer_norm_eps), act=_activation(t.hidden_act, str(folder)), id_offset=1,
            pad_token_id=int(tokenizer.pad_token_id), eos_token_id=int(tokenizer.eos_token_id))
  if family == "clip":
    projection = getattr(config, "projection_dim", 0) if "text_projection.weight" in names else 0
    kw.update(pool="eos", causal=True, proj_dim=projection)
  else:
    kw.update(pool="last", attend_padding=True, proj_dim=t.projection_size, proj_bias=True)
  return TowerArch("hf", family, "text", folder, tuple(kw.items()))


def _big_vision(path: pathlib.Path, side: str) -> TowerArch:
  """SigLIP from big_vision: sizes from the shapes under img/ or txt/ (flax layouts: heads are a kernel axis)."""
  tree = "img" if side == "image" else "txt"
  shapes = {k: v.shape for k, v in checkpoint_folder.read_npz(path).items() if k.startswith(tree + "/")}
  if not shapes:
    raise ValueError(f"{path} has no {tree}/ parameters: it holds no {side} tower (a big_vision SigLIP .npz "
                     f"has img/ and txt/)")
  encoder = f"{tree}/Transformer" if side == "image" else f"{tree}/Encoder_0"
  depth = sum(1 for k in shapes if k.startswith(f"{encoder}/encoderblock_") and k.endswith("LayerNorm_0/scale"))
  block = f"{encoder}/encoderblock_0"
  try:
    width, heads, _ = shapes[f"{block}/MultiHeadDotProductAttention_0/query/kernel"]
    mlp_dim = shapes[f"{block}/MlpBlock_0/Dense_0/kernel"][1]
    positions = shapes[f"{tree}/pos_embedding"][1]
  except KeyError as e:
    raise ValueError(f"{path}: {e.args[0]} is missing; not a big_vision SigLIP {side} tower") from None
  kw = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, act="gelu_tanh", layer_norm_eps=1e-6)
  if side == "image":
    patch = shapes[f"{tree}/embedding/kernel"][0]
    kw.update(patch_size=patch, pool="map" if f"{tree}/MAPHead_0/probe" in shapes else "mean")
    return TowerArch("big_vision", "siglip", side, path, tuple(kw.items()),
                     image_size=int(round(positions ** 0.5)) * patch)
  kw.update(vocab_size=shapes[f"{tree}/Embed_0/embedding"][0], max_len=positions, pool="last", attend_padding=True,
            id_offset=1, pad_token_id=BIG_VISION_PAD_ID, proj_dim=shapes[f"{tree}/head/kernel"][1], proj_bias=True)
  return TowerArch("big_vision", "siglip", side, path, tuple(kw.items()))


@functools.lru_cache(maxsize=32)
def describe(spec: str, side: str) -> TowerArch:
  """The architecture of the `side` tower of checkpoint `spec` ('hf:FOLDER' | 'big_vision:FILE.npz')."""
  if side not in SIDES:
    raise ValueError(f"side={side!r}: use one of {SIDES}")
  parsed = checkpoint_folder.parse_spec(spec)
  if parsed is None:
    raise ValueError(f"{spec!r} is not a checkpoint tower; use hf:FOLDER or big_vision:FILE.npz")
  scheme, path = parsed
  local = checkpoint_folder.local_path(path)
  if scheme == "big_vision":
    return _big_vision(local, side)
  return _hf_image(local) if side == "image" else _hf_text(local)


# == Tower builders (registered under the scheme: build_model looks 'hf:...' up as 'hf') ==========
def image_tower(arch: TowerArch, config: oclear.ModelConfig | None = None) -> vit.ViTEncoder:
  fields = arch.fields
  if config is None:
    return vit.ViTEncoder(**fields)
  return vit.ViTEncoder(**fields, dropout=config.dropout, dtype=config.compute_dtype, remat=config.remat)


def text_tower(arch: TowerArch, config: oclear.ModelConfig | None = None) -> text_lib.TextEncoder:
  fields = arch.fields
  if config is None:
    return text_lib.TextEncoder(**fields)
  return text_lib.TextEncoder(**fields, dropout=config.dropout, dtype=config.compute_dtype, remat=config.remat)


def _build_image(config: oclear.ModelConfig) -> nn.Module:
  return image_tower(describe(config.image_tower, "image"), config)


def _build_text(config: oclear.ModelConfig, vocab_size: int, max_len: int) -> nn.Module:
  arch = describe(config.text_tower, "text")
  fields = arch.fields
  if vocab_size - fields["id_offset"] > fields["vocab_size"]:
    raise ValueError(f"the records' tokenizer has {vocab_size - fields['id_offset']} tokens but the text tower "
                     f"{config.text_tower} embeds {fields['vocab_size']}; set config.data.tokenizer to the "
                     f"checkpoint's own folder")
  if max_len > fields["max_len"]:
    raise ValueError(f"config.data.max_title_len={max_len} exceeds the text tower's {fields['max_len']} positions")
  return text_tower(arch, config)


for _scheme in checkpoint_folder.SCHEMES:
  oclear.register_image_tower(_scheme)(_build_image)
  oclear.register_text_tower(_scheme)(_build_text)
