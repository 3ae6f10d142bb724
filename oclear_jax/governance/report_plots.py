"""The report's pictures: class sizes before/after (log axes), counts per decision, thumbnail sheets.

Plots use a `matplotlib.figure.Figure` with an Agg canvas (no display, no global backend change),
as oclear_jax/retrieval/plots.py does; thumbnail sheets are drawn with PIL.
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from oclear_jax.governance import featurize

_TILE = 96
_CAPTION_LINES = 4


def plot_class_sizes(before: Mapping[str, int], after: Mapping[str, int], path: str) -> None:
  """Rank-size curves (size of the k-th largest category) before and after, both axes logarithmic."""
  fig = Figure(figsize=(6.5, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, sizes, style in (("raw labels", before, "-"), ("curated categories", after, "--")):
    values = np.sort(np.array([v for v in sizes.values() if v > 0]))[::-1]
    if len(values):
      ax.plot(np.arange(1, len(values) + 1), values, style, label=f"{name} ({len(values)})")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("category rank")
  ax.set_ylabel("items")
  ax.set_title("Class sizes before and after governance")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)


def plot_decisions(counts: Mapping[str, int], path: str) -> None:
  """Horizontal bars: items per step/action (e.g. 'outliers/relabelled'), log x axis."""
  items = sorted(counts.items(), key=lambda kv: -kv[1])
  fig = Figure(figsize=(6.5, 0.45 * len(items) + 1.2), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  names = [k for k, _ in items]
  values = [v for _, v in items]
  colours = ["#c0392b" if k.endswith("dropped") else "#e67e22" if k.endswith("relabelled") else "#27ae60"
             for k in names]
  ax.barh(np.arange(len(items)), values, color=colours)
  ax.set_yticks(np.arange(len(items)), names)
  ax.invert_yaxis()
  ax.set_xscale("log")
  for y, v in enumerate(values):
    ax.text(v, y, f" {v}", va="center")
  ax.set_xlabel("items (log)")
  ax.set_title("Decisions per step")
  fig.tight_layout()
  fig.savefig(path)


def _font() -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=10)
  except TypeError:  # Pillow < 10.1.
    return ImageFont.load_default()


def _thumbnail(path: str) -> Image.Image:
  image, _, error = featurize.read_image(path)
  if image is None:  # An unreadable image is shown as what it is.
    tile = Image.new("RGB", (_TILE, _TILE), (235, 235, 235))
    draw = ImageDraw.Draw(tile)
    draw.line((0, 0, _TILE, _TILE), fill=(200, 0, 0), width=2)
    draw.line((0, _TILE, _TILE, 0), fill=(200, 0, 0), width=2)
    draw.text((4, 4), error[:14], fill=(120, 0, 0), font=_font())
    return tile
  image.thumbnail((_TILE, _TILE))
  tile = Image.new("RGB", (_TILE, _TILE), (255, 255, 255))
  tile.paste(image, ((_TILE - image.width) // 2, (_TILE - image.height) // 2))
  return tile


def thumbnail_sheet(rows: Sequence[Sequence[tuple[str, str]]], path: str, title: str) -> bool:
  """A sheet of rows of (image path, caption) tiles; False (and no file) when there is nothing to show."""
  rows = [r for r in rows if r]
  if not rows:
    return False
  font = _font()
  line_height = 12
  cell_h = _TILE + line_height * _CAPTION_LINES + 6
  width = max(len(r) for r in rows) * (_TILE + 8) + 8
  sheet = Image.new("RGB", (max(width, 320), 24 + len(rows) * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  draw.text((8, 6), title, fill=(0, 0, 0), font=font)
  for y, row in enumerate(rows):
    for x, (image_path, caption) in enumerate(row):
      left, top = 8 + x * (_TILE + 8), 24 + y * cell_h
      sheet.paste(_thumbnail(image_path), (left, top))
      lines = textwrap.wrap(caption, width=17)[:_CAPTION_LINES]
      for k, line in enumerate(lines):
        draw.text((left, top + _TILE + 2 + k * line_height), line, fill=(40, 40, 40), font=font)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  sheet.save(path)
  return True
