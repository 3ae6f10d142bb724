"""Registered image preprocessing ops and the pipe-string parser (big_vision style).

A config says `"decode|random_resized_crop(64)|flip_lr|value_range(-1, 1)"`; each
piece names a registered op factory and its arguments (Python literals, positional or
keyword). `get_preprocess_fn` turns the string into one function on a feature dict that
rewrites the `image` key.

Random ops are stateless: they draw from `features["seed"]` (an int64[2] tensor the
pipeline derives from its base seed and the example index), split once per op, so the
same seed and order give the same pixels on every run and every machine.
"""

import ast
from typing import Callable

import tensorflow as tf

# An op factory takes the op's arguments and returns fn(image, seed) -> image.
ImageOp = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
_REGISTRY: dict[str, Callable[..., ImageOp]] = {}
_RANDOM_OPS: set[str] = set()


def register_op(name: str, *, random: bool = False):
  """Decorator registering an op factory under `name` (random ops need a seed)."""
  def wrap(factory):
    if name in _REGISTRY:
      raise ValueError(f"preprocessing op {name!r} is already registered")
    _REGISTRY[name] = factory
    if random:
      _RANDOM_OPS.add(name)
    return factory
  return wrap


def registered_ops() -> list[str]:
  return sorted(_REGISTRY)


def parse_op(spec: str) -> tuple[str, tuple, dict]:
  """'resize(64)' -> ('resize', (64,), {}); a bare 'flip_lr' has no arguments."""
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing op {spec!r}: {e}") from e
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f"preprocessing op {spec!r} must look like name or name(args)")
  args = tuple(ast.literal_eval(a) for a in node.args)
  kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  return node.func.id, args, kwargs


def get_preprocess_fn(spec: str) -> Callable[[dict], dict]:
  """Builds fn(features) -> features applying the ops of `spec` to features['image']."""
  ops, names = [], []
  for piece in filter(None, (p.strip() for p in spec.split("|"))):
    name, args, kwargs = parse_op(piece)
    if name not in _REGISTRY:
      raise ValueError(f"unknown preprocessing op {name!r} in {spec!r}; "
                       f"registered ops: {', '.join(registered_ops())}")
    ops.append(_REGISTRY[name](*args, **kwargs))
    names.append(name)
  needs_seed = any(n in _RANDOM_OPS for n in names)

  def preprocess(features: dict) -> dict:
    features = dict(features)
    if needs_seed and "seed" not in features:
      raise ValueError(f"{spec!r} has random ops but the features carry no 'seed'")
    seeds = (tf.unstack(tf.random.experimental.stateless_split(features["seed"], num=len(ops)),
                        num=len(ops)) if needs_seed else [None] * len(ops))
    image = features["image"]
    for op, seed in zip(ops, seeds):
      image = op(image, seed)
    features["image"] = image
    return features

  return preprocess


def _size2(size) -> list[int]:
  return [size, size] if isinstance(size, int) else list(size)


@register_op("decode")
def decode(channels: int = 3) -> ImageOp:
  return lambda image, seed: tf.io.decode_jpeg(image, channels=channels)


@register_op("resize")
def resize(size) -> ImageOp:
  """Resizes to size (int: square) with antialiasing; output float32 in input range."""
  return lambda image, seed: tf.image.resize(image, _size2(size), antialias=True)


@register_op("random_resized_crop", random=True)
def random_resized_crop(size, scale_min: float = 0.6, scale_max: float = 1.0,
                        ratio_min: float = 3 / 4, ratio_max: float = 4 / 3) -> ImageOp:
  """Inception crop: a random box of scale_min..scale_max of the area, resized."""
  def op(image, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
        area_range=(scale_min, scale_max), aspect_ratio_range=(ratio_min, ratio_max),
        min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, _size2(size), antialias=True)
  return op


@register_op("flip_lr", random=True)
def flip_lr() -> ImageOp:
  return lambda image, seed: tf.image.stateless_random_flip_left_right(image, seed)


@register_op("color_jitter", random=True)
def color_jitter(brightness: float = 0.2, contrast: float = 0.2) -> ImageOp:
  """Brightness/contrast jitter; works in [0, 1] and returns float32 in [0, 255]."""
  def op(image, seed):
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    x = tf.cast(image, tf.float32) / 255.0
    if brightness:
      x = tf.image.stateless_random_brightness(x, brightness, s1)
    if contrast:
      x = tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast, s2)
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0
  return op


@register_op("value_range")
def value_range(lo: float = -1.0, hi: float = 1.0) -> ImageOp:
  """Maps [0, 255] (uint8 or float) linearly to [lo, hi] as float32."""
  return lambda image, seed: tf.cast(image, tf.float32) / 255.0 * (hi - lo) + lo
