"""Per-item features: image descriptors and hashes (a per-item pass), title vectors (on the driver).

Image descriptors come from a pluggable extractor (`config.governance.image_features`):
  efficientnet_lite0  ImageNet EfficientNet-Lite0 pooled features (oclear_jax.features.feature_cache,
                      cached on disk: a ConvNet pass is the slowest part of governance on a CPU);
  pixels              a cheap colour-and-layout descriptor (an 8x8 colour thumbnail minus its mean,
                      plus a square-rooted 4x4x4 colour histogram), enough for clean catalogue shots
                      and fast enough for unit tests.
Every decodable image also gets a content hash (sha256 of its bytes: exact duplicates) and a 64-bit
perceptual hash (imagehash.phash: near duplicates). An image that cannot be decoded is never
dropped silently: its `ok` is False and `errors` says why, for the decision log.

Titles become TF-IDF vectors of character 2-4-grams (robust to the synonyms, word order and
punctuation of real listings), fitted on the governed titles; n-grams seen in one title only are
left out (min_df=2) since they cannot make two titles alike.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
from collections.abc import Sequence

import imagehash
import numpy as np
import scipy.sparse
from PIL import Image, ImageOps
from sklearn.feature_extraction import text as sklearn_text

from oclear_jax.governance import settings as settings_lib

PIXEL_DESCRIPTOR_DIM = 8 * 8 * 3 + 64


@dataclasses.dataclass
class ImageFeatures:
  """Image descriptors of N items, in input order."""
  vectors: np.ndarray  # f32[N, D]; zero rows where not ok
  ok: np.ndarray  # bool[N]
  errors: list[str]  # '' where ok, else the reason ('missing', 'not_an_image', 'corrupt: ...')
  sha256: list[str]  # '' where unreadable
  phash: np.ndarray  # uint64[N]; 0 where not ok

  @staticmethod
  def concatenate(parts: Sequence["ImageFeatures"], dim: int) -> "ImageFeatures":
    if not parts:
      return ImageFeatures(np.zeros((0, dim), np.float32), np.zeros((0,), bool), [], [], np.zeros((0,), np.uint64))
    return ImageFeatures(
        vectors=np.concatenate([p.vectors for p in parts]), ok=np.concatenate([p.ok for p in parts]),
        errors=[e for p in parts for e in p.errors], sha256=[s for p in parts for s in p.sha256],
        phash=np.concatenate([p.phash for p in parts]))


def read_image(path: str) -> tuple[Image.Image | None, bytes, str]:
  """(RGB image, file bytes, '') or (None, bytes, reason); never raises on a bad file."""
  if not os.path.exists(path):
    return None, b"", "missing"
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return None, b"", f"unreadable: {e}"
  if not data:
    return None, data, "empty_file"
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # A full decode, so that truncation shows here.
      image = ImageOps.exif_transpose(image)
      if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if "transparency" in image.info else image.convert("RGB")
      return image.copy(), data, ""
  except Image.UnidentifiedImageError:
    return None, data, "not_an_image"
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types; a bad file must not stop the run.
    return None, data, "truncated" if "truncated" in str(e).lower() else f"corrupt: {type(e).__name__}: {e}"


def colour_layout(image: Image.Image) -> np.ndarray:
  """The 'pixels' descriptor: f32[PIXEL_DESCRIPTOR_DIM], layout (8x8 colours) and colour histogram."""
  thumb = np.asarray(image.resize((8, 8), Image.Resampling.BILINEAR), np.float32) / 255.0
  small = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 255.0
  bins = np.minimum((small * 4).astype(np.int64), 3)
  index = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
  histogram = np.bincount(index.ravel(), minlength=64).astype(np.float32) / index.size
  return np.concatenate([(thumb - thumb.mean()).ravel(), np.sqrt(histogram)]).astype(np.float32)


def descriptor_dim(settings: settings_lib.GovernanceSettings) -> int:
  if settings.image_features == "pixels":
    return PIXEL_DESCRIPTOR_DIM
  from oclear_jax.models import efficientnet  # pylint: disable=g-import-not-at-top  (imports jax)
  return efficientnet.HEAD_WIDTH


def featurize_chunk(paths: Sequence[str], settings: settings_lib.GovernanceSettings,
                    cache_dir: str | None = None) -> ImageFeatures:
  """The per-item pass over one chunk of image paths (run by an executor, in process or on Beam)."""
  n = len(paths)
  dim = descriptor_dim(settings)
  vectors = np.zeros((n, dim), np.float32)
  ok = np.zeros((n,), bool)
  errors, digests = [""] * n, [""] * n
  phashes = np.zeros((n,), np.uint64)
  for i, path in enumerate(paths):
    image, data, error = read_image(path)
    if data:
      digests[i] = hashlib.sha256(data).hexdigest()
    if image is None:
      errors[i] = error
      continue
    ok[i] = True
    phashes[i] = np.uint64(int(str(imagehash.phash(image)), 16))
    if settings.image_features == "pixels":
      vectors[i] = colour_layout(image)
  if settings.image_features == "efficientnet_lite0" and ok.any():
    from oclear_jax.features import feature_cache  # pylint: disable=g-import-not-at-top  (imports jax)
    readable = [p for p, good in zip(paths, ok) if good]
    encoded = feature_cache.extract_features(readable, image_size=settings.image_size, batch_size=settings.batch_size,
                                             cache_dir=cache_dir, progress=False)
    rows = np.flatnonzero(ok)
    vectors[rows] = encoded["pooled"]
    for row, good in zip(rows, encoded["ok"]):
      if not good:  # Decodable by PIL here but not by the encoder's loader: still never silent.
        ok[row], errors[row] = False, "encoder could not read the image"
  return ImageFeatures(vectors=vectors, ok=ok, errors=errors, sha256=digests, phash=phashes)


def featurize_images(paths: Sequence[str], settings: settings_lib.GovernanceSettings, executor,
                     cache_dir: str | None = None) -> ImageFeatures:
  """All items' image features, chunk by chunk through `executor` (same chunks on every executor)."""
  chunks = [list(paths[i:i + settings.chunk_size]) for i in range(0, len(paths), settings.chunk_size)]
  fn = functools.partial(featurize_chunk, settings=settings, cache_dir=cache_dir)
  parts = executor.map_chunks("featurize images", fn, chunks, sizes=[len(c) for c in chunks])
  return ImageFeatures.concatenate(parts, descriptor_dim(settings))


@dataclasses.dataclass
class TitleFeatures:
  vectors: scipy.sparse.csr_matrix  # f32[N, V], rows l2-normalised; empty rows where absent
  present: np.ndarray  # bool[N]: the title is non-empty and shares n-grams with the vocabulary
  vocabulary_size: int


def title_features(titles: Sequence[str], fit_rows: np.ndarray) -> TitleFeatures:
  """TF-IDF of character n-grams; the vocabulary and IDF come from `titles[fit_rows]`."""
  titles = [t or "" for t in titles]
  fit_titles = [titles[i] for i in np.flatnonzero(fit_rows) if titles[i].strip()]
  vectorizer = sklearn_text.TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True,
                                            min_df=2 if len(fit_titles) > 2 else 1, dtype=np.float32)
  try:
    vectorizer.fit(fit_titles)
  except ValueError:  # No titles, or no n-gram shared by two titles: governance runs on images alone.
    return TitleFeatures(scipy.sparse.csr_matrix((len(titles), 1), dtype=np.float32), np.zeros(len(titles), bool), 0)
  vectors = vectorizer.transform(titles).tocsr()
  present = np.asarray(vectors.getnnz(axis=1) > 0) & np.array([bool(t.strip()) for t in titles], bool)
  return TitleFeatures(vectors, present, len(vectorizer.vocabulary_))
