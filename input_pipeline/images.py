"""Image files as a run's model inputs: the one loader that serving and the feature caches share.

`load_image` is the caches' preprocessing (`decode|resize(S)|value_range(-1, 1)` in PIL: RGB, a
square bilinear resize, antialiased when shrinking, x / 127.5 - 1); `PREPROCESS_VERSION` names it
in the caches' keys. `preprocess_image_files` turns a user's files into exactly what the run's
eval path fed the model: re-encoded like the records and run through `data.eval_preprocess` for a
run on records, through `load_image` for a run on cached tower outputs.
"""
from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow as tf
from PIL import Image

from input_pipeline import preprocess_ops
from input_pipeline import records as records_lib

PREPROCESS_VERSION = "pil-rgb|resize-bilinear-square|value_range(-1,1)|v1"


def load_image(path: str, image_size: int, max_pixels: int = records_lib.MAX_IMAGE_PIXELS) -> np.ndarray:
  """One file -> f32[S, S, 3] in [-1, 1]; raises OSError/ValueError naming the file if unreadable."""
  try:
    with records_lib.open_bounded(path, max_pixels) as image:
      image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
      pixels = np.asarray(image, np.float32)
  except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...).
    raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
  return pixels / 127.5 - 1.0


def preprocess_image_files(paths: Sequence[str], data: ml_collections.ConfigDict, *,
                           first_index: int = 0) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
  """(inputs f32[k, H, W, 3] of the readable files, their positions in `paths`, [(position, reason)]
  of the unreadable ones). Never raises on a bad file.

  Each file is re-encoded like the records (`records.encode_image`, in threads: PIL releases the
  GIL) and then run through `data.eval_preprocess`; `first_index + position` is the example index
  of the op seed, as the eval pipeline's enumerate gives it (eval ops are deterministic anyway).
  A run trained on cached tower outputs (`data.input` tower_features / trunk_activations) saw its
  images through the caches' loader (`load_image`), so its files are loaded that way:
  what is served is what was trained and evaluated (the two loaders differ by a JPEG re-encode and a
  second resampling, cosine ~0.98 between their Lite0 features).
  """
  if data.input != "records":
    return _cached_input_images(paths, data.stored_image_size, data.max_image_pixels)
  size = data.stored_image_size or None
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    encoded = list(pool.map(lambda p: records_lib.encode_image(p, size, data.max_image_pixels), paths))
  kept = [i for i, (jpeg, _) in enumerate(encoded) if jpeg is not None]
  failed = [(i, reason) for i, (jpeg, reason) in enumerate(encoded) if jpeg is None]
  if not kept:
    return np.zeros((0,), np.float32), kept, failed
  preprocess = preprocess_ops.get_preprocess_fn(data.eval_preprocess)

  def as_input(jpeg, index):
    features = preprocess({"image": jpeg, "seed": tf.stack([tf.constant(0, tf.int64), index])})
    return tf.cast(features["image"], tf.float32)

  ds = tf.data.Dataset.from_tensor_slices((tf.constant([encoded[i][0] for i in kept]),
                                           tf.constant([first_index + i for i in kept], tf.int64)))
  images = ds.map(as_input).batch(len(kept)).get_single_element()
  return np.asarray(images), kept, failed


def _cached_input_images(paths: Sequence[str], size: int,
                         max_pixels: int) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
  images, kept, failed = [], [], []
  for i, path in enumerate(paths):
    try:
      images.append(load_image(path, size, max_pixels))
      kept.append(i)
    except ValueError:
      failed.append((i, records_lib.encode_image(path, size, max_pixels)[1] or "unreadable"))  # the records' reason words
  return (np.stack(images) if images else np.zeros((0,), np.float32)), kept, failed
