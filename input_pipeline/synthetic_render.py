"""Draws synthetic products: clean catalogue shots and distorted shopper photos.

Each product is drawn once as a high-resolution RGBA "sprite" (shape filled with its
pattern, outlined, with its code and brand initial printed on it). Catalogue images
paste the sprite on a light background with a little jitter; shopper photos rotate,
rescale and place it on clutter, then crop, relight, blur and JPEG-compress the result.
Drawing the sprite once keeps generation fast and makes every image of a product show
the same object, which is what retrieval has to recognise.

All randomness comes from the `np.random.Generator` passed in, so output is a pure
function of the generator's state.
"""

import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from input_pipeline import synthetic_products

_WHITE = (250, 250, 250)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  """Pillow's bundled font; scalable where Pillow has FreeType (no font downloads)."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType.
    return ImageFont.load_default()


def _colour(name: str) -> tuple[int, int, int]:
  return _WHITE if name == "white" else synthetic_products.COLOURS[name][0]


def _polygon(n: int, radius: float, centre: float, phase: float = -math.pi / 2,
             inner: float | None = None) -> list[tuple[float, float]]:
  """Regular polygon (or star, if `inner` radius is given) vertices."""
  points = []
  steps = 2 * n if inner else n
  for i in range(steps):
    r = inner if inner and i % 2 else radius
    angle = phase + 2 * math.pi * i / steps
    points.append((centre + r * math.cos(angle), centre + r * math.sin(angle)))
  return points


def _shape_mask(shape: str, s: int) -> Image.Image:
  """A 0/255 mask of `shape` filling most of an s x s square."""
  mask = Image.new("L", (s, s), 0)
  draw = ImageDraw.Draw(mask)
  c, r, lo, hi = s / 2, s * 0.47, s * 0.03, s * 0.97
  if shape == "circle":
    draw.ellipse((lo, lo, hi, hi), fill=255)
  elif shape == "square":
    draw.rounded_rectangle((s * 0.08, s * 0.08, s * 0.92, s * 0.92), radius=s * 0.08, fill=255)
  elif shape == "triangle":
    draw.polygon([(c, lo), (hi, s * 0.9), (lo, s * 0.9)], fill=255)
  elif shape == "star":
    draw.polygon(_polygon(5, r, c, inner=r * 0.48), fill=255)
  elif shape == "hexagon":
    draw.polygon(_polygon(6, r, c, phase=0.0), fill=255)
  elif shape == "pentagon":
    draw.polygon(_polygon(5, r, c), fill=255)
  elif shape == "diamond":
    draw.polygon([(c, lo), (s * 0.85, c), (c, hi), (s * 0.15, c)], fill=255)
  elif shape == "heart":
    draw.ellipse((s * 0.05, s * 0.1, s * 0.53, s * 0.58), fill=255)
    draw.ellipse((s * 0.47, s * 0.1, s * 0.95, s * 0.58), fill=255)
    draw.polygon([(s * 0.07, s * 0.42), (s * 0.93, s * 0.42), (c, s * 0.95)], fill=255)
  elif shape == "ring":
    draw.ellipse((lo, lo, hi, hi), fill=255)
    draw.ellipse((s * 0.3, s * 0.3, s * 0.7, s * 0.7), fill=0)
  elif shape == "cross":
    draw.rectangle((s * 0.34, lo, s * 0.66, hi), fill=255)
    draw.rectangle((lo, s * 0.34, hi, s * 0.66), fill=255)
  else:
    raise ValueError(f"unknown shape {shape!r}; known: {list(synthetic_products.SHAPES)}")
  return mask


def _pattern(product: synthetic_products.Product, s: int,
             rng: np.random.Generator) -> np.ndarray:
  """An s x s x 3 float texture of the product's pattern in its two colours."""
  c1 = np.array(_colour(product.colour), np.float32)
  c2 = np.array(_colour(product.accent), np.float32)
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  period = s / rng.choice([6.0, 8.0, 10.0])
  if product.pattern == "solid":
    t = np.zeros((s, s), np.float32)
  elif product.pattern == "stripes":
    angle = rng.choice([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
    t = ((xx * math.cos(angle) + yy * math.sin(angle)) // period % 2).astype(np.float32)
  elif product.pattern == "dots":
    dx, dy = xx % period - period / 2, yy % period - period / 2
    t = (dx**2 + dy**2 < (period * 0.3)**2).astype(np.float32)
  elif product.pattern == "checks":
    t = ((xx // period + yy // period) % 2).astype(np.float32)
  elif product.pattern == "gradient":
    t = yy / (s - 1) if rng.random() < 0.5 else xx / (s - 1)
  elif product.pattern == "zigzag":
    wave = np.abs((xx / period) % 2 - 1) * period
    t = ((yy + wave) // period % 2).astype(np.float32)
  else:
    raise ValueError(f"unknown pattern {product.pattern!r}")
  return c1 * (1 - t[..., None]) + c2 * t[..., None]


def render_sprite(product: synthetic_products.Product, rng: np.random.Generator,
                  resolution: int = 256) -> Image.Image:
  """The product drawn once, as RGBA with a transparent background."""
  s = resolution
  mask = _shape_mask(product.shape, s)
  rgb = _pattern(product, s, rng)
  # A darker outline makes light products visible on light catalogue backgrounds.
  # (A blurred mask thresholded near full is a cheap erosion; MinFilter is ~10x slower.)
  solid = np.asarray(mask, np.float32)
  blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(s / 80)), np.float32)
  inner = np.where(blurred > 240, solid, 0.0)
  edge = (solid - inner)[..., None] / 255
  dark = np.array(_colour(product.colour), np.float32) * 0.45
  rgb = rgb * (1 - edge) + dark * edge
  # Print the code at the shape's centroid, and the brand initial under it.
  ys, xs = np.nonzero(inner > 0)
  cx, cy = float(xs.mean()), float(ys.mean())
  if product.shape == "triangle":
    cy += s * 0.08  # The centroid sits close to the narrow top; move into the body.
  luminance = float(np.dot(_colour(product.colour), (0.299, 0.587, 0.114)))
  # Dark ink with a light halo on light products, and the reverse on dark ones.
  dark_ink, light_ink = (15, 15, 15), (245, 245, 245)
  ink, halo_rgb = (dark_ink, light_ink) if luminance > 140 else (light_ink, dark_ink)
  text_layer = Image.new("L", (s, s), 0)
  ink_layer = Image.new("L", (s, s), 0)
  draws = (ImageDraw.Draw(text_layer), ImageDraw.Draw(ink_layer))
  for text, size, y in ((product.code, int(s * 0.24), cy),
                        (product.brand[0], int(s * 0.13), cy + s * 0.19)):
    font = _font(size)
    stroke = max(1, size // 12)
    draws[0].text((cx, y), text, fill=255, font=font, anchor="mm", stroke_width=stroke)
    draws[1].text((cx, y), text, fill=255, font=font, anchor="mm")
  halo_a = np.asarray(text_layer, np.float32)[..., None] / 255
  ink_a = np.asarray(ink_layer, np.float32)[..., None] / 255
  rgb = rgb * (1 - halo_a) + np.array(halo_rgb, np.float32) * halo_a
  rgb = rgb * (1 - ink_a) + np.array(ink, np.float32) * ink_a
  alpha = np.maximum(np.asarray(mask), np.asarray(text_layer))
  rgba = np.dstack([np.clip(rgb, 0, 255).astype(np.uint8), alpha])
  return Image.fromarray(rgba, "RGBA")


def _scaled(sprite: Image.Image, side: float) -> Image.Image:
  side = max(4, int(round(side)))
  return sprite.resize((side, side), Image.Resampling.LANCZOS)


def render_doc(sprite: Image.Image, size_fraction: float, image_size: int,
               rng: np.random.Generator) -> Image.Image:
  """A catalogue shot: the product centred on a light background, lightly jittered."""
  tone = rng.integers(236, 256)
  tint = np.clip(tone + rng.integers(-4, 5, size=3), 0, 255)
  canvas = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in tint))
  product = _scaled(sprite, size_fraction * image_size * rng.uniform(0.95, 1.05))
  if rng.random() < 0.5:
    product = product.rotate(rng.uniform(-4, 4), Image.Resampling.BICUBIC, expand=True)
  jitter = 0.04 * image_size
  x = (image_size - product.width) / 2 + rng.uniform(-jitter, jitter)
  y = (image_size - product.height) / 2 + rng.uniform(-jitter, jitter)
  canvas.paste(product, (int(round(x)), int(round(y))), product)
  return canvas


def _clutter_background(side: int, difficulty: float, avoid: np.ndarray,
                        rng: np.random.Generator) -> Image.Image:
  """A busy scene: smooth colour blobs, grain and a few random shapes and lines.

  The base tone keeps away from the product's mean colour `avoid`, so the product is
  not camouflaged (a shopper photographs a product that stands out, more or less).
  """
  base = rng.uniform(40, 230, size=3)
  for _ in range(8):
    if np.abs(base - avoid).sum() > 150:
      break
    base = rng.uniform(40, 230, size=3)
  blobs = Image.fromarray(rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8), "RGB")
  blobs = np.asarray(blobs.resize((side, side), Image.Resampling.BICUBIC), np.float32)
  mix = min(0.6, 0.2 + 0.4 * difficulty)
  grain = rng.normal(0, 6 + 10 * difficulty, size=(side, side, 1))
  scene = base * (1 - mix) + blobs * mix + grain
  image = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8), "RGB")
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.poisson(2 + 6 * difficulty))):
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    x0, y0 = rng.uniform(-0.2, 1.0, size=2) * side
    w, h = rng.uniform(0.05, 0.45, size=2) * side
    kind = rng.integers(3)
    if kind == 0:
      draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=int(rng.integers(1, 4)))
    elif kind == 1:
      draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
    else:
      draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
  return image


def _jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=int(quality))
  buffer.seek(0)
  return Image.open(buffer).convert("RGB")


def render_query(sprite: Image.Image, size_fraction: float, image_size: int,
                 difficulty: float, rng: np.random.Generator) -> Image.Image:
  """A shopper photo of the product; every distortion scales with `difficulty`.

  The product is placed on clutter with a rotation, offset and scale change, then the
  frame is randomly cropped, relit (brightness, contrast, colour cast), blurred, given
  sensor noise and JPEG-compressed. At difficulty 1 a product is still recognisable
  by shape, colours and code; at 0 only the background differs from a catalogue shot.
  """
  d = max(0.0, float(difficulty))
  side = int(round(image_size * (1 + 0.25 * min(d, 1.0))))
  rgba = np.asarray(sprite, np.float32)
  mean_colour = (rgba[..., :3] * rgba[..., 3:]).sum((0, 1)) / max(1.0, rgba[..., 3].sum())
  canvas = _clutter_background(side, d, mean_colour, rng)
  scale = size_fraction * image_size * (1 + rng.uniform(-0.1, 0.25) * d)
  product = _scaled(sprite, scale).rotate(
      rng.uniform(-30, 30) * d, Image.Resampling.BICUBIC, expand=True)
  shift = 0.1 * side * d
  x = (side - product.width) / 2 + rng.uniform(-shift, shift)
  y = (side - product.height) / 2 + rng.uniform(-shift, shift)
  canvas.paste(product, (int(round(x)), int(round(y))), product)
  crop = side * (1 - rng.uniform(0, 0.2) * min(d, 1.0))
  x0, y0 = rng.uniform(0, side - crop, size=2) if side > crop else (0.0, 0.0)
  canvas = canvas.resize((image_size, image_size), Image.Resampling.BILINEAR,
                         box=(x0, y0, x0 + crop, y0 + crop))
  pixels = np.asarray(canvas, np.float32)
  contrast = 1 + rng.uniform(-0.25, 0.2) * d
  brightness = rng.uniform(-35, 35) * d
  cast = rng.normal(0, 15 * d, size=3)
  pixels = (pixels - 128) * contrast + 128 + brightness + cast
  pixels += rng.normal(0, 3 * d, size=pixels.shape)
  canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
  radius = rng.uniform(0, 0.8) * d * image_size / 64
  if radius > 0.15:
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius))
  return _jpeg_round_trip(canvas, np.clip(90 - rng.uniform(15, 45) * d, 20, 95))


def near_duplicate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """A re-uploaded copy of a catalogue image: shifted a pixel or two and re-encoded."""
  dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
  corner = image.getpixel((0, 0))
  shifted = Image.new("RGB", image.size, corner)
  shifted.paste(image, (dx, dy))
  return _jpeg_round_trip(shifted, rng.integers(70, 91))
