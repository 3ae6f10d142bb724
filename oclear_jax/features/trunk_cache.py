"""Frozen EfficientNet-Lite0 trunk activations of image files for several augmented views, cached on disk.

Why: partial fine-tuning (`model.image_trainable_from=k`, `data.input='trunk_activations'`) trains
blocks k..15 and the head conv of the image tower; the stem and blocks 0..k-1 are frozen, so their
output is a fixed function of the (augmented) pixels. On a 2-core CPU the trunk costs nearly all
of a forward pass, so it runs once per (image, view) and training reads the maps back.

Views: view 0 is the eval preprocessing (`input_pipeline.images.load_image`: decode, square resize to
`image_size`, value_range(-1, 1)), so the eval rows' view 0 gives the eval path's numbers (up to the
float16 storage); view v >= 1 is a random-resized crop (area 0.6-1, aspect 3/4-4/3, as the records'
`random_resized_crop`) of that resized image, resized back (bilinear) and flipped with p=1/2, its
randomness seeded by sha256(the file's bytes, v) only: every rerun, process and machine -- and every
copy of the catalogue in another folder -- draws the same crop for the same image.

Storage: one folder per key, `{cache_dir}/efficientnet_lite0-trunk-{S}px-k{k}-v{V}-{key}/` holding
`activations.npy` (float16 [M, h, w, c], one row per (path, view) item, read memory-mapped: 40k
images x 2 views at 7x7x192 is 1.5 GB) and `index.npz` (the items' paths, views, `ok`, failures).
The key hashes the weights file's bytes, the image size, k, the views, the augmentation version and
the sorted (path, size, mtime, views) set, so a changed file or setting never reuses stale maps. The
folder is written under a temporary name and renamed: a reader never sees half a cache.
Unreadable images are never dropped silently: their rows are zeros, `ok` False, named in `failures`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from PIL import Image

from input_pipeline import images as images_lib
from oclear_jax.models import efficientnet
from oclear_jax.weights import efficientnet_lite0
from oclear_jax.features import feature_cache

AUGMENT_VERSION = ("v0=" + images_lib.PREPROCESS_VERSION + "|v>=1: pil resize(S), crop area[0.6,1] "
                   "aspect[3/4,4/3] bilinear resize(S), flip 1/2, rng=sha256(file bytes|view)|v1")
CROP_AREA, CROP_ASPECT = (0.6, 1.0), (3 / 4, 4 / 3)


@dataclasses.dataclass
class TrunkCache:
  """The cached trunk maps of a set of (path, view) items (see the module docstring)."""
  activations: np.ndarray  # f16[M, h, w, c], memory-mapped
  paths: np.ndarray  # str[M]
  views: np.ndarray  # int32[M]
  ok: np.ndarray  # bool[M]
  failures: np.ndarray  # str[F]: 'path: reason'
  directory: str
  computed: bool  # False: read from the cache
  images_per_s: float | None = None  # the trunk pass's rate when computed

  def rows(self, paths: Sequence[str], view: int | np.ndarray = 0) -> np.ndarray:
    """int64[N]: the item rows of (paths[i], view[i]); KeyError names a missing item."""
    index = {(p, int(v)): i for i, (p, v) in enumerate(zip(self.paths.tolist(), self.views.tolist()))}
    views = np.broadcast_to(np.asarray(view), (len(paths),))
    return np.asarray([index[(os.fspath(p), int(v))] for p, v in zip(paths, views)], np.int64)


def cache_key(items: Sequence[tuple[str, int]], *, image_size: int, trainable_from: int) -> str:
  """Hex key of an item set: weights bytes, size, k, views, augmentation, (path, content hash, views)."""
  weights = str(efficientnet_lite0.weights_path())
  views: dict[str, int] = {}
  for path, view in items:
    views[path] = max(views.get(path, 0), view + 1)
  payload = {
      "weights_sha256": feature_cache.file_fingerprint(weights),
      "image_size": int(image_size),
      "trainable_from": int(trainable_from),
      "augment": AUGMENT_VERSION,
      "files": [(p, feature_cache.file_fingerprint(p), views[p]) for p in sorted(views)],
  }
  return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _view_seed(content_sha256: bytes, view: int) -> int:
  return int.from_bytes(hashlib.sha256(content_sha256 + f"|{view}".encode()).digest()[:8], "little")


def augmented_view(resized: Image.Image, content_sha256: bytes, view: int) -> np.ndarray:
  """View `view` >= 1 of an image already resized to S x S: f32[S, S, 3] in [-1, 1] (module docstring)."""
  size = resized.size[0]
  rng = np.random.default_rng(_view_seed(content_sha256, view))
  box = (0, 0, size, size)
  for _ in range(10):  # torchvision's / TF's rejection loop; the whole image if no box fits
    area = size * size * rng.uniform(*CROP_AREA)
    aspect = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if 0 < w <= size and 0 < h <= size:
      x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
      box = (x0, y0, x0 + w, y0 + h)
      break
  image = resized.resize((size, size), Image.BILINEAR, box=box)
  if rng.uniform() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def load_views(path: str, image_size: int, views: Sequence[int]) -> list[np.ndarray]:
  """The listed views of one file; raises ValueError naming the file if it cannot be read."""
  out = []
  try:
    with open(path, "rb") as f:
      content = f.read()
    with Image.open(io.BytesIO(content)) as image:
      resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
  except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...).
    raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
  for view in views:
    # View 0 is images.load_image's arithmetic on the same resized pixels: the eval path.
    out.append(np.asarray(resized, np.float32) / 127.5 - 1.0 if view == 0 else
               augmented_view(resized, hashlib.sha256(content).digest(), view))
  return out


def _compute(items: list[tuple[str, int]], directory: str, *, image_size: int, trainable_from: int,
             batch_size: int, progress: bool) -> tuple[float, dict[str, np.ndarray]]:
  """Writes `activations.npy` in `directory`; returns (images/s, the index arrays)."""
  params = jax.tree.map(jnp.asarray, efficientnet_lite0.load_params())
  model = efficientnet.EfficientNetLite0()
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, trainable_from,
                                             method="trunk").astype(jnp.float16))
  shape = efficientnet.trunk_shape(image_size, trainable_from)
  out = np.lib.format.open_memmap(os.path.join(directory, "activations.npy"), mode="w+", dtype=np.float16,
                                  shape=(len(items), *shape))
  ok = np.zeros((len(items),), bool)
  failures: dict[str, str] = {}

  def decode(start: int) -> np.ndarray:
    batch = np.zeros((batch_size, image_size, image_size, 3), np.float32)  # fixed shape: one compile
    chunk = items[start:start + batch_size]
    by_path: dict[str, list[int]] = {}
    for row, (path, _) in enumerate(chunk):
      by_path.setdefault(path, []).append(row)
    for path, rows in by_path.items():  # one decode per file for all its views in the batch
      try:
        for row, pixels in zip(rows, load_views(path, image_size, [chunk[r][1] for r in rows])):
          batch[row] = pixels
          ok[start + row] = True
      except ValueError as e:
        failures[path] = str(e)
    return batch

  starts = list(range(0, len(items), batch_size))
  began = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, tqdm.tqdm(
      total=len(items), unit="img", desc=f"efficientnet_lite0 trunk (k={trainable_from})",
      disable=not progress) as bar:
    pending = pool.submit(decode, starts[0]) if starts else None
    for n, start in enumerate(starts):
      batch = pending.result()
      if n + 1 < len(starts):  # decode the next batch while this one runs
        pending = pool.submit(decode, starts[n + 1])
      count = min(batch_size, len(items) - start)
      rows = slice(start, start + count)
      out[rows] = np.asarray(forward(params, batch))[:count] * ok[rows, None, None, None]
      bar.update(count)
  out.flush()
  del out
  rate = len(items) / max(time.perf_counter() - began, 1e-9)
  index = {"paths": np.asarray([p for p, _ in items], dtype=str), "views": np.asarray([v for _, v in items], np.int32),
           "ok": ok, "failures": np.asarray(sorted(failures.values()), dtype=str)}
  return rate, index


def trunk_activations(image_paths: Sequence[str], num_views: Sequence[int] | int, *, image_size: int,
                      trainable_from: int, cache_dir: str | os.PathLike, batch_size: int = 64,
                      progress: bool = True) -> TrunkCache:
  """Trunk maps (`EfficientNetLite0.trunk(., trainable_from)`) of views 0..num_views[i]-1 of each path.

  Computed once per key (`cache_key`) and read back memory-mapped afterwards.
  """
  efficientnet.check_trainable_from(trainable_from)
  if trainable_from < 1:
    raise ValueError("trunk_activations: trainable_from=0 has no frozen trunk (the 'trunk' is the images); "
                     "train on records instead")
  if image_size < 32 or batch_size < 1:
    raise ValueError(f"trunk_activations: need image_size >= 32 and batch_size >= 1; got {image_size}, {batch_size}")
  paths = [os.fspath(p) for p in image_paths]
  counts = np.broadcast_to(np.asarray(num_views), (len(paths),))
  if len(paths) and counts.min() < 1:
    raise ValueError(f"trunk_activations: every path needs at least one view (view 0), got {counts.min()}")
  views: dict[str, int] = {}
  for path, count in zip(paths, counts.tolist()):
    views[path] = max(views.get(path, 0), int(count))
  items = [(p, v) for p in sorted(views) for v in range(views[p])]
  key = cache_key(items, image_size=image_size, trainable_from=trainable_from)
  max_views = max(views.values(), default=0)
  directory = os.path.join(os.fspath(cache_dir),
                           f"efficientnet_lite0-trunk-{image_size}px-k{trainable_from}-v{max_views}-{key[:24]}")
  rate, computed = None, False
  if not os.path.exists(os.path.join(directory, "index.npz")):
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      rate, index = _compute(items, tmp, image_size=image_size, trainable_from=trainable_from,
                             batch_size=batch_size, progress=progress)
      np.savez(os.path.join(tmp, "index.npz"), **index)
      try:
        os.rename(tmp, directory)  # atomic: the folder appears complete or not at all
      except OSError:  # another process finished the same key first: its copy is as good
        if not os.path.exists(os.path.join(directory, "index.npz")):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    computed = True
    logging.info("trunk cache: %d items (%d files, k=%d, %d views) at %.1f images/s -> %s", len(items),
                 len(views), trainable_from, max_views, rate, directory)
  with np.load(os.path.join(directory, "index.npz"), allow_pickle=False) as stored:
    index = {name: stored[name] for name in stored.files}
  activations = np.load(os.path.join(directory, "activations.npy"), mmap_mode="r")
  if len(index["failures"]):
    logging.warning("trunk cache: %d unreadable images, e.g. %s", len(index["failures"]), index["failures"][0])
  return TrunkCache(activations=activations, paths=index["paths"], views=index["views"], ok=index["ok"],
                    failures=index["failures"], directory=directory, computed=computed, images_per_s=rate)
