"""The files of a tower checkpoint a researcher brings: `hf:FOLDER` or `big_vision:FILE.npz`, local or in a bucket.

A Hugging Face folder holds `config.json` (read with `transformers.AutoConfig`), `model.safetensors`
or shards named by `model.safetensors.index.json`, `preprocessor_config.json` (the image mean and
std it was trained with) and, for a text tower, its tokenizer files. A big_vision checkpoint is one
`.npz` of '/'-joined parameter paths. Nothing here reaches the network: `gs://` and other URLs are
copied once into a local cache (`input_pipeline/paths.py`), keyed by the URL.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from input_pipeline import paths

SCHEMES = ("hf", "big_vision")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"


def parse_spec(spec: str) -> tuple[str, str] | None:
  """'hf:/ckpt/clip' -> ('hf', '/ckpt/clip'); a registered tower name ('vit') -> None."""
  scheme, sep, path = str(spec).partition(":")
  if not sep or scheme not in SCHEMES:
    return None
  if not path:
    raise ValueError(f"tower {spec!r} names no path; use {scheme}:/path/to/checkpoint")
  return scheme, path


def is_checkpoint(spec: str) -> bool:
  return parse_spec(spec) is not None


def _cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("OCLEAR_CHECKPOINT_CACHE", os.path.join(tempfile.gettempdir(), "oclear_towers")))


@functools.lru_cache(maxsize=16)
def local_path(path: str) -> pathlib.Path:
  """A local folder or file for `path`; a URL is copied down once (a folder, or a single .npz)."""
  if not paths.is_remote(path):
    local = pathlib.Path(path)
    if not local.exists():
      raise FileNotFoundError(f"tower checkpoint {path} does not exist; fix config.model.image_tower / text_tower")
    return local
  target = _cache_root() / hashlib.sha256(path.encode()).hexdigest()[:24] / os.path.basename(path.rstrip("/"))
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    if paths.isdir(path):
      paths.copy_tree_down(path, str(target))
    else:
      target.write_bytes(paths.read_bytes(path))
  return target


def hf_config(folder: pathlib.Path) -> Any:
  """The folder's config.json as a `transformers` config class (CLIPConfig, SiglipVisionConfig, Dinov2Config...)."""
  import transformers  # pylint: disable=g-import-not-at-top  (only when a checkpoint tower is asked for)
  if not (folder / "config.json").exists():
    raise FileNotFoundError(f"{folder} has no config.json: a Hugging Face tower folder holds config.json and "
                            f"model.safetensors (save_pretrained writes both)")
  return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)


def safetensors_names(folder: pathlib.Path) -> list[str]:
  """The tensor names of the folder's weights: the shard index's, else the file header's (no tensor is read)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if not (folder / SAFETENSORS).exists() and (folder / SAFETENSORS_INDEX).exists():
    return sorted(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"])
  names = []
  for shard in _shards(folder):
    with safe_open(str(shard), framework="numpy") as f:
      names.extend(f.keys())
  return names


def _shards(folder: pathlib.Path) -> list[pathlib.Path]:
  if (folder / SAFETENSORS).exists():
    return [folder / SAFETENSORS]
  if (folder / SAFETENSORS_INDEX).exists():
    weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
    return [folder / name for name in sorted(set(weight_map.values()))]
  raise FileNotFoundError(f"{folder} holds neither {SAFETENSORS} nor {SAFETENSORS_INDEX} (PyTorch .bin files "
                          f"are not read: convert with save_pretrained(safe_serialization=True))")


def read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of the folder's weights (one file or all shards), as float32 numpy arrays."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors: dict[str, np.ndarray] = {}
  for shard in _shards(folder):
    for name, value in load_file(str(shard)).items():
      tensors[name] = np.asarray(value, np.float32)
  return tensors


def read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A big_vision checkpoint's arrays by '/'-joined path, without a leading 'params/'."""
  with np.load(path, allow_pickle=False) as f:
    return {name.removeprefix("params/"): np.asarray(f[name], np.float32) for name in f.files}


def image_normalisation(folder: pathlib.Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel on [0, 1] pixels, from the folder's preprocessor_config.json."""
  path = folder / PREPROCESSOR
  if not path.exists():
    raise FileNotFoundError(f"{folder} has no {PREPROCESSOR}: the image mean and std the tower was trained with "
                            f"are read from it (save the checkpoint's image processor beside its weights)")
  config = json.loads(path.read_text())
  if not config.get("do_normalize", True):
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  rescale = config.get("rescale_factor", 1 / 255)
  if not np.isclose(rescale, 1 / 255):
    raise ValueError(f"{path}: rescale_factor={rescale} is not 1/255; the preprocessing feeds pixels in [0, 1]")
  mean, std = config.get("image_mean"), config.get("image_std")
  if mean is None or std is None:
    raise ValueError(f"{path} lacks image_mean / image_std")
  mean = (float(mean),) * 3 if np.isscalar(mean) else tuple(float(m) for m in mean)
  std = (float(std),) * 3 if np.isscalar(std) else tuple(float(s) for s in std)
  return mean, std


def fingerprint(path: pathlib.Path) -> str:
  """SHA-256 over a checkpoint's files (names and bytes): what feature caches key frozen towers by."""
  digest = hashlib.sha256()
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  for file in files:
    digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
    with open(file, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def hf_tokenizer(folder: pathlib.Path) -> Any:
  """The folder's tokenizer through `transformers.AutoTokenizer` (CLIP BPE, SigLIP SentencePiece), offline."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
