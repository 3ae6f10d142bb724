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

# `config.model` switches -> the encoder's parameter subtree they act on.
IMAGE_SUBTREE, TEXT_SUBTREE = "image_encoder", "text_encoder"


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


def _without(tree: Mapping[str, Any], frozen: Sequence[str]) -> dict[str, Any]:
  """`tree` ({'encoder': ..., 'class_centers': ...}) without the frozen encoder subtrees."""
  return {**tree, "encoder": {k: v for k, v in tree["encoder"].items() if k not in frozen}}


def freeze_towers(tx: optax.GradientTransformation, frozen: Sequence[str]) -> optax.GradientTransformation:
  """`tx` on the trained parameters only; zero updates and no optimizer state for the frozen towers.

  Not `optax.multi_transform` / `optax.masked`: their states hold `MaskedNode`s where the frozen
  leaves were, which the logical-sharding helpers and the checkpoint restore target turn into
  mismatched trees. Here the inner state is simply built over the params minus the frozen subtrees.
  """
  if not frozen:
    return tx
  frozen = tuple(frozen)

  def init(params):
    return tx.init(_without(params, frozen))

  def update(updates, state, params=None):
    trained, state = tx.update(_without(updates, frozen), state,
                               None if params is None else _without(params, frozen))
    encoder = {k: (jax.tree.map(jnp.zeros_like, v) if k in frozen else trained["encoder"][k])
               for k, v in updates["encoder"].items()}
    return {**trained, "encoder": encoder}, state

  return optax.GradientTransformation(init, update)


def _flat(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_structure(loaded: Any, current: Any, *, what: str) -> None:
  """Raises naming every missing, unexpected and mis-shaped parameter of `loaded` against `current`."""
  loaded_flat, current_flat = _flat(loaded), _flat(current)
  missing = sorted(set(current_flat) - set(loaded_flat))
  unexpected = sorted(set(loaded_flat) - set(current_flat))
  shapes = {k: (tuple(np.shape(loaded_flat[k])), tuple(current_flat[k].shape))
            for k in sorted(set(loaded_flat) & set(current_flat))
            if tuple(np.shape(loaded_flat[k])) != tuple(current_flat[k].shape)}
  if missing or unexpected or shapes:
    raise ValueError(
        f"{what} does not fit the model's tower: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
        f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}, shape (loaded, model) "
        f"{dict(list(shapes.items())[:8])}. Check config.model.image_tower / text_tower and their sizes "
        f"(the pretrained towers have fixed sizes), or set config.model.*_pretrained=False")


def load_pretrained_into_state(state: dict[str, Any], shardings: dict[str, Any], model_config: Any, *,
                               loader: Callable[[str], Any] | None = None) -> dict[str, Any]:
  """`state` with its pretrained towers' parameters replaced by the loaded ones, same shardings and dtypes.

  Call after a fresh init only. `loader` defaults to `oclear_jax.weights.load_pretrained`.
  """
  towers = pretrained_towers(model_config)
  if not towers:
    return state
  if loader is None:
    from oclear_jax import weights  # pylint: disable=g-import-not-at-top  (loaders import lazily)
    loader = weights.load_pretrained
  encoder = dict(state["params"]["encoder"])
  for subtree, tower_name in towers.items():
    if subtree not in encoder:
      raise ValueError(f"the model has no parameters under encoder/{subtree} to load {tower_name!r} into")
    loaded = loader(tower_name)
    current = encoder[subtree]
    check_same_structure(loaded, current, what=f"load_pretrained({tower_name!r})")
    encoder[subtree] = jax.tree.map(
        lambda new, old, sharding: jax.device_put(np.asarray(new, dtype=old.dtype), sharding),
        loaded, current, shardings["params"]["encoder"][subtree])
  return {**state, "params": {**state["params"], "encoder": encoder}}
