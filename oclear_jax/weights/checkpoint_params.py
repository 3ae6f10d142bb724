"""A checkpoint tower's weights as the Flax params of the tower `models/checkpoint_towers.py` builds.

`read_tower(spec, side, like)` maps every file tensor through the family's rules (`hf_layout`,
`big_vision_layout`) and returns the params tree plus what did not fit on the file's side: tensors
the rules expect but the file lacks, tensors the file has that nothing reads, tensors of a shape no
transform accepts. `weights/tower_loading.load_tower` joins that with the tower-side check
(missing, unexpected, mis-shaped parameters) into one error naming all of them. Tensors no forward
pass reads (position-id buffers, DINOv2's mask token, the contrastive loss's scale and bias) and
the other tower's half of a joint checkpoint are consumed by name, never skipped by pattern.

Position embeddings are the one parameter whose shape the data decides: when `data.image_size`
gives another patch grid than the checkpoint's, the grid is resized bilinearly
(`jax.image.resize`, half-pixel centres as torch's `align_corners=False`; antialiased when
shrinking), the class token's row kept. Hugging Face's own `interpolate_pos_encoding` is bicubic.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from oclear_jax.models import checkpoint_towers
from oclear_jax.weights import big_vision_layout
from input_pipeline import checkpoint_folder
from oclear_jax.weights import hf_layout


def resize_positions(pos: np.ndarray, target: tuple[int, ...], has_cls: bool) -> np.ndarray:
  """pos f32[(1 +) g*g, D] -> f32[target]: the g x g grid resized bilinearly; shapes that are no grid pass as is."""
  if pos.shape == tuple(target) or pos.ndim != 2 or len(target) != 2 or pos.shape[1] != target[1]:
    return pos  # equal, or a mismatch the structure check names
  lead = 1 if has_cls else 0
  old, new = pos.shape[0] - lead, target[0] - lead
  g, t = math.isqrt(max(old, 0)), math.isqrt(max(new, 0))
  if g * g != old or t * t != new:
    return pos
  grid = jax.image.resize(pos[lead:].reshape(g, g, -1), (t, t, pos.shape[1]), method="bilinear")
  return np.concatenate([pos[:lead], np.asarray(grid, np.float32).reshape(t * t, -1)], axis=0)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _rules(arch: checkpoint_towers.TowerArch) -> tuple[dict[str, hf_layout.Rule], tuple[str, ...], tuple[str, ...]]:
  f = arch.fields
  map_head = f.get("pool") == "map"
  if arch.scheme == "big_vision":
    return (big_vision_layout.rules(arch.side, f["depth"], map_head), big_vision_layout.UNUSED,
            big_vision_layout.OTHER_TOWER[arch.side])
  if arch.side == "image":
    rules = hf_layout.image_rules(arch.family, f["depth"], f["num_heads"], bool(f.get("proj_dim")), map_head)
  else:
    rules = hf_layout.text_rules(arch.family, f["depth"], f["num_heads"], bool(f.get("proj_dim")))
  return rules, hf_layout.UNUSED, hf_layout.OTHER_TOWER[arch.side]


def _without_tower_prefix(arch: checkpoint_towers.TowerArch, rules: dict[str, Any],
                          tensors: dict[str, Any]) -> dict[str, Any]:
  """The rules for a single-tower CLIP / SigLIP file as transformers 5 writes it: no 'vision_model.' /
  'text_model.' prefix (hub checkpoints have it). Errors then name the file's own tensor names."""
  if arch.scheme != "hf" or arch.family == "dinov2":
    return rules
  prefix = "vision_model." if arch.side == "image" else "text_model."
  if any(name.startswith(prefix) for name in tensors):
    return rules
  return {key.removeprefix(prefix): rule for key, rule in rules.items()}


def map_tensors(arch: checkpoint_towers.TowerArch, tensors: dict[str, Any]) -> tuple[dict[str, Any], dict, dict]:
  """(params tree, file problems, {our path: file tensor}) from file tensors by the family's rules; runs on
  shapes too (jax.eval_shape)."""
  rules, unused, other_tower = _rules(arch)
  rules = _without_tower_prefix(arch, rules, tensors)
  unused = unused + tuple(u.partition(".")[2] for u in unused if u.endswith("position_ids"))
  tree: dict[str, Any] = {}
  sources: dict[tuple[str, ...], str] = {}  # our path -> the file tensor it came from
  missing, unreadable = [], []
  for key, (path, transform) in rules.items():
    name = key.split("#")[0]  # 'in_proj_weight#query': one file tensor feeding several parameters
    if name not in tensors:
      missing.append(name)
      continue
    try:
      value = transform(tensors[name])
    except ValueError:
      unreadable.append(f"{name} {tuple(tensors[name].shape)}")
      continue
    _set(tree, path, value)
    sources[path] = name
  read = {key.split("#")[0] for key in rules}
  unexpected = sorted(n for n in tensors if n not in read and n not in unused and not n.startswith(other_tower))
  problems = {"file tensors missing": sorted(set(missing)), "file tensors unread": unexpected,
              "file tensors of a shape the layout cannot take": unreadable}
  return tree, {k: v for k, v in problems.items() if v}, sources


def read_tower(spec: str, side: str, like: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """(params, file problems) of the `side` tower of `spec`, fitted to `like` (the tower's params or shapes)."""
  arch = checkpoint_towers.describe(spec, side)
  tensors = (checkpoint_folder.read_npz(arch.path) if arch.scheme == "big_vision"
             else checkpoint_folder.read_safetensors(arch.path))
  tree, problems, sources = map_tensors(arch, tensors)
  tree = jax.tree.map(lambda v: np.asarray(v, np.float32), tree)
  if "pos_embed" in tree and "pos_embed" in like:
    tree["pos_embed"] = resize_positions(tree["pos_embed"], tuple(like["pos_embed"].shape),
                                         bool(arch.fields.get("cls_pos")))
  wrong = []
  for path, name in sorted(sources.items(), key=lambda kv: kv[1]):
    ours, want = tree, like
    for key in path:
      ours, want = ours[key], (want.get(key) if hasattr(want, "get") else None)
      if want is None:
        break
    if want is not None and tuple(ours.shape) != tuple(want.shape):
      wrong.append(f"{name} {tuple(tensors[name].shape)}")
  if wrong:
    problems["file tensors of the wrong shape for the config"] = wrong
  return tree, problems
