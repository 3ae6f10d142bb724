"""The combination checks of `config_schema.validate`: training input, fine-tuning and towers.

What must agree between fields (a cached-feature input and frozen towers, partial fine-tuning and a
pretrained tower split in blocks, concept-fusion sizes); `config_schema` holds the fields and their
defaults and calls these. Nothing of the package is imported: configs validate before jax loads.
"""
from __future__ import annotations

import functools

import ml_collections


INPUTS = ("records", "tower_features", "trunk_activations")
HEAD_LOSSES = ("margin_softmax", "info_nce")
SELECT_ON = ("", "val")
# data.input='tower_features': the towers whose outputs the trainer caches (train/input_sources.py).
FEATURE_TOWERS = {"image": ("image_tower", "efficientnet_lite0"), "text": ("text_tower", "minilm")}
checkpoint_tower = lambda tower: tower.partition(":")[0] in ("hf", "big_vision")  # 'hf:FOLDER' (weights/)


def validate_training_input(config: ml_collections.ConfigDict) -> None:
  """data.input, head.loss and eval.select_on, and what they need of the rest."""
  data, model = config.data, config.model
  for key, allowed in (("data.input", INPUTS), ("head.loss", HEAD_LOSSES), ("eval.select_on", SELECT_ON)):
    value = functools.reduce(lambda node, part: node[part], key.split("."), config)
    if value not in allowed:
      raise ValueError(f"config.{key}={value!r}: use one of {allowed}")
  if config.head.loss == "info_nce":
    if not config.train.both_views:
      raise ValueError("config.head.loss='info_nce' pairs each row's query view with its document view; "
                       "set config.train.both_views=True")
    if config.head.temperature <= 0:
      raise ValueError(f"config.head.temperature={config.head.temperature} must be positive")
  if model.title_match_dim and not config.train.both_views:
    raise ValueError("config.model.title_match_dim > 0 matches each row's photo (query view) to its title (document "
                     "view); set config.train.both_views=True")
  _validate_fine_tuning(config)
  if data.input not in ("tower_features", "trunk_activations"):
    return
  trunk = data.input == "trunk_activations"
  sides = (() if trunk else ("image",)) + (("text",) if model.fusion != "image_only" else ())
  for side in sides:
    tower_key, tower = FEATURE_TOWERS[side]
    if not model[f"freeze_{side}_tower"] or (model[tower_key] != tower and not checkpoint_tower(model[tower_key])):
      raise ValueError(
          f"config.data.input={data.input!r} trains on cached outputs of frozen pretrained towers, but the "
          f"{side} tower is config.model.{tower_key}={model[tower_key]!r} with "
          f"freeze_{side}_tower={model[f'freeze_{side}_tower']}; set config.model.{tower_key}={tower!r}, "
          f"{side}_pretrained=True and freeze_{side}_tower=True"
          + (" (or fusion='image_only')" if side == "text" else "") + ", or use config.data.input='records'")
  if data.stored_image_size < 32:
    raise ValueError(f"config.data.stored_image_size={data.stored_image_size}: data.input={data.input!r} "
                     f"computes image features at that size, which must be at least 32")
  if data.governed and data.balanced_sampling:
    raise ValueError(f"config.data.input={data.input!r} draws batches uniformly (epochs of permutations); "
                     "governance's class-balanced sampling is only applied to records: set "
                     "config.data.balanced_sampling=False or config.data.input='records'")


def _validate_fine_tuning(config: ml_collections.ConfigDict) -> None:
  """model.image_trainable_from, optimizer.pretrained_lr_scale and data.input='trunk_activations'."""
  data, model = config.data, config.model
  scale = config.optimizer.pretrained_lr_scale
  if not scale >= 0:  # 0: the pretrained layers run but stay still (e.g. heads on cached augmented views)
    raise ValueError(f"config.optimizer.pretrained_lr_scale={scale} must be >= 0 (1 = the full learning rate)")
  k, lite0 = model.image_trainable_from, model.image_tower == "efficientnet_lite0"
  if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= (16 if lite0 else 1000):
    raise ValueError(f"config.model.image_trainable_from={k!r}: use an int in 0..16 for Lite0 (0 = the whole tower "
                     f"trains, k = blocks k..15 and the head conv train), 0..depth for a checkpoint ViT")
  if k > 0:
    if not (lite0 or checkpoint_tower(model.image_tower)):
      raise ValueError(f"config.model.image_trainable_from={k} splits a pretrained tower in blocks, but "
                       f"config.model.image_tower={model.image_tower!r}; use 'efficientnet_lite0' or a checkpoint "
                       f"('hf:FOLDER'), or set config.model.image_trainable_from=0")
    if not model.image_pretrained:
      raise ValueError(f"config.model.image_trainable_from={k} would freeze random blocks; set "
                       f"config.model.image_pretrained=True or config.model.image_trainable_from=0")
    if model.freeze_image_tower:
      raise ValueError(f"config.model.image_trainable_from={k} trains blocks {k}.. of the image tower, but "
                       f"config.model.freeze_image_tower=True freezes all of it; set freeze_image_tower=False "
                       f"(or image_trainable_from=0)")
  if data.input == "trunk_activations":
    if k < 1 or model.freeze_image_tower or not lite0:  # (a checkpoint ViT trains from block k on records)
      raise ValueError(f"config.data.input='trunk_activations' trains EfficientNet-Lite0 from block "
                       f"config.model.image_trainable_from on cached trunk maps; set freeze_image_tower=False and "
                       f"image_trainable_from to 1..16 (got {k}; 0 = the whole tower: use data.input='records')")
    if data.trunk_views < 1:
      raise ValueError(f"config.data.trunk_views={data.trunk_views} must be at least 1 (view 0 = eval preprocessing)")


def validate_towers(model: ml_collections.ConfigDict) -> None:
  """Frozen switches that cannot work, and concept-fusion sizes (which pretrained weights ship is
  `train/pretrained_towers.check_shipped`'s to say: the schema imports nothing of the package)."""
  # fusion='image_only' builds no text tower: its text switches are ignored (the fusion alone flips an ablation).
  for side in ("image",) + (("text",) if model.fusion != "image_only" else ()):
    pretrained, frozen = model[f"{side}_pretrained"], model[f"freeze_{side}_tower"]
    if frozen and not pretrained:
      raise ValueError(f"config.model.freeze_{side}_tower=True with config.model.{side}_pretrained=False would "
                       f"train on frozen random features; load weights ({side}_pretrained=True) or unfreeze")
  if model.fusion == "concept_attention":
    if model.concept_slots <= 0:
      raise ValueError(f"config.model.concept_slots={model.concept_slots} must be positive for "
                       f"fusion='concept_attention'")
    if model.concept_heads <= 0 or model.embed_dim % model.concept_heads:
      raise ValueError(f"config.model.concept_heads={model.concept_heads} must divide "
                       f"config.model.embed_dim={model.embed_dim} (the concept attention width)")
