"""Figures for retrieval reports: Recall@K curves and qualitative contact sheets.

Both render off-screen. The Recall@K plot builds a `matplotlib.figure.Figure`
with an Agg canvas directly instead of going through `pyplot`, so it neither
needs a display nor changes the process-wide matplotlib backend. The contact
sheet is drawn with PIL, which gives exact pixel control over tiles, borders
and captions and keeps the file small (PNG output is palette-quantised).
"""
from collections.abc import Mapping, Sequence
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from input_pipeline import paths

# Tile border colours: relevant, irrelevant, query.
_GREEN = (30, 160, 60)
_RED = (210, 40, 40)
_BLUE = (40, 90, 200)
_GREY = (150, 150, 150)  # relevance unknown (a user's search, not an evaluation)


def plot_recall_at_k(
    curves: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike[str],
    *,
    title: str = "Recall@K",
) -> None:
  """Saves one Recall@K line per model (e.g. "trained" vs "untrained").

  Args:
    curves: {model name: {k: recall in [0, 1]}}.
    path: output image path; the format follows the extension.
    title: figure title.
  """
  fig = Figure(figsize=(6, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, curve in curves.items():
    ks = sorted(curve)
    ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
  ax.set_xscale("log")
  all_ks = sorted({k for curve in curves.values() for k in curve})
  if all_ks:
    ax.set_xticks(all_ks)
    ax.set_xticklabels([str(k) for k in all_ks])
    ax.minorticks_off()
  ax.set_ylim(0.0, 1.02)
  ax.set_xlabel("K (log scale)")
  ax.set_ylabel("Recall@K")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  if curves:
    ax.legend(loc="lower right")
  fig.tight_layout()
  path = os.fspath(path)
  with paths.open(path, "wb") as f:  # a file object: savefig cannot reach gs:// by name
    fig.savefig(f, format=os.path.splitext(path)[1].lstrip(".") or "png")


def _font(size: int) -> ImageFont.ImageFont:
  """Pillow's bundled scalable font (no system fonts needed)."""
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed bitmap font.
    return ImageFont.load_default()


def _fit_image(image: np.ndarray, size: int) -> Image.Image:
  """Letterboxes an HxWx3 uint8 image into a white size x size square."""
  img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  img.thumbnail((size, size), Image.Resampling.LANCZOS)
  canvas = Image.new("RGB", (size, size), "white")
  canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
  return canvas


def _caption_lines(text: str, width_chars: int, max_lines: int) -> list[str]:
  """Wraps a caption, ending with an ellipsis when it does not fit."""
  lines = textwrap.wrap(text, width=width_chars) or [""]
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1][:max(0, width_chars - 1)].rstrip() + "…"
  return lines


def _tile(
    image: np.ndarray,
    caption: str,
    colour: tuple[int, int, int],
    tile: int,
    border: int,
    font: ImageFont.ImageFont,
    caption_lines: int,
    line_height: int,
) -> Image.Image:
  """One framed image with its caption underneath."""
  cell = Image.new("RGB", (tile, tile + caption_lines * line_height + 4), "white")
  draw = ImageDraw.Draw(cell)
  draw.rectangle([0, 0, tile - 1, tile - 1], fill=colour)
  inner = tile - 2 * border
  cell.paste(_fit_image(image, inner), (border, border))
  width_chars = max(4, int(tile / (0.55 * line_height)))
  for i, line in enumerate(_caption_lines(caption, width_chars, caption_lines)):
    draw.text((2, tile + 2 + i * line_height), line, fill=(0, 0, 0), font=font)
  return cell


def contact_sheet(
    query_images: Sequence[np.ndarray],
    results: Sequence[Sequence[tuple[np.ndarray, str, bool]]],
    path: str | os.PathLike[str],
    query_captions: Sequence[str] | None = None,
    *,
    tile: int = 128,
    caption_lines: int = 3,
) -> None:
  """Renders one row per query: the query, then its ranked results.

  Each result is framed green when relevant, red when not and grey when
  unknown (None, e.g. a user's search); the query is framed blue. Captions
  (e.g. "0.83 · Blue denim jacket") are wrapped to the tile width and
  truncated with an ellipsis after `caption_lines` lines.

  Args:
    query_images: Q images, HxWx3 uint8 (any size; letterboxed into tiles).
    results: per query, a ranked list of (image, caption, is_relevant or None).
    path: output path; ".png" is palette-quantised to stay small (about
      1 MB for 10 rows x 11 tiles of photos), ".jpg" is also fine.
    query_captions: optional Q captions for the query tiles.
    tile: tile side in pixels.
    caption_lines: caption lines under each tile.
  """
  if len(results) != len(query_images):
    raise ValueError(f"{len(query_images)} queries but {len(results)} result rows")
  if query_captions is not None and len(query_captions) != len(query_images):
    raise ValueError("query_captions must match query_images")
  line_height = max(10, tile // 10)
  font = _font(line_height - 2)
  border = max(3, tile // 32)
  gap = 6
  cols = 1 + max((len(r) for r in results), default=0)
  cell_h = tile + caption_lines * line_height + 4
  width = cols * tile + (cols - 1) * gap + gap  # Extra gap after the query column.
  height = max(1, len(query_images)) * (cell_h + gap)
  sheet = Image.new("RGB", (width, height), "white")
  for row, (query, row_results) in enumerate(zip(query_images, results)):
    y = row * (cell_h + gap)
    caption = "QUERY" + (f": {query_captions[row]}" if query_captions is not None else "")
    sheet.paste(_tile(query, caption, _BLUE, tile, border, font, caption_lines, line_height), (0, y))
    for col, (image, text, relevant) in enumerate(row_results, start=1):
      x = col * (tile + gap) + gap
      colour = _GREY if relevant is None else _GREEN if relevant else _RED
      sheet.paste(_tile(image, f"{col}. {text}", colour, tile, border, font, caption_lines,
                        line_height), (x, y))
  path = os.fspath(path)
  with paths.open(path, "wb") as f:  # a file object: PIL cannot reach gs:// by name
    if path.lower().endswith(".png"):
      sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(f, format="PNG", optimize=True)
    else:
      sheet.save(f, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "JPEG"), quality=85)
