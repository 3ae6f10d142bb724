"""A tiny on-disk catalogue with planted problems, built with PIL for the input tests.

12 categories x 3 rows (1 doc + 2 queries); labels 0-7 train, 8-11 eval. Planted:
image modes that must convert (greyscale, CMYK JPEG, RGBA PNG); images that must be
skipped (zero-byte, truncated JPEG, text named .jpg, missing file); CSV rows with an
empty id, image or label; an empty title, a 10,000-character title and a title with a
non-UTF-8 byte.
"""

import csv
import io
import pathlib

import numpy as np
from PIL import Image

NUM_LABELS = 12
EVAL_LABELS = {f"cat{i:02d}" for i in range(8, 12)}
# id -> reason the record writer must give.
BAD_IMAGES = {
    "p01_q1": "empty_file",
    "p02_q1": "truncated",
    "p03_q1": "not_an_image",
    "p04_q1": "missing",
}
CONVERTED = {"p05_q1": "L", "p06_q1": "CMYK", "p07_q1": "RGBA"}
EMPTY_TITLE_ID = "p00_q2"
LONG_TITLE_ID = "p01_q2"
NON_UTF8_ID = "p02_q2"
NUM_GOOD_ROWS = NUM_LABELS * 3  # Rows with id, image and label.
NUM_EMPTY_FIELD_ROWS = 3


def _save(image: Image.Image, path: pathlib.Path, fmt: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, format=fmt)


def make_tiny_catalogue(root: pathlib.Path) -> pathlib.Path:
  """Writes images and catalogue.csv (id,image,title,label,kind,split) under root."""
  rng = np.random.default_rng(0)
  rows = []
  for c in range(NUM_LABELS):
    label = f"cat{c:02d}"
    split = "eval" if label in EVAL_LABELS else "train"
    base = rng.integers(0, 255, size=3)
    for kind, suffix in (("doc", "d"), ("query", "q1"), ("query", "q2")):
      row_id = f"p{c:02d}_{suffix}"
      pixels = np.clip(base + rng.integers(-20, 20, size=(24, 32, 3)), 0, 255).astype(np.uint8)
      image = Image.fromarray(pixels)
      rel = f"images/{row_id}.jpg"
      if row_id in CONVERTED:
        mode = CONVERTED[row_id]
        if mode == "RGBA":
          rel = f"images/{row_id}.png"
          _save(image.convert("RGBA"), root / rel, "PNG")
        else:
          _save(image.convert(mode), root / rel, "JPEG")
      elif row_id in BAD_IMAGES:
        reason = BAD_IMAGES[row_id]
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if reason == "empty_file":
          path.write_bytes(b"")
        elif reason == "truncated":
          buffer = io.BytesIO()
          big = Image.fromarray(rng.integers(0, 255, (256, 256, 3)).astype(np.uint8))
          big.save(buffer, format="JPEG", quality=95)
          path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        elif reason == "not_an_image":
          path.write_text("this is not a jpeg\n")
        # "missing": write nothing.
      else:
        _save(image, root / rel, "JPEG")
      title = f"{label} product {c} {kind} shirt"
      if row_id == EMPTY_TITLE_ID:
        title = ""
      elif row_id == LONG_TITLE_ID:
        title = "long " * 2000
      elif row_id == NON_UTF8_ID:
        title = "caf@@BAD@@ chair"
      rows.append([row_id, rel, title, label, kind, split])
  rows += [["", "images/p00_d.jpg", "no id", "cat00", "doc", "train"],
           ["x_noimage", "", "no image", "cat00", "doc", "train"],
           ["x_nolabel", "images/p00_d.jpg", "no label", "", "doc", "train"]]
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(["id", "image", "title", "label", "kind", "split"])
  writer.writerows(rows)
  csv_path = root / "catalogue.csv"
  csv_path.write_bytes(text.getvalue().encode("utf-8").replace(b"@@BAD@@", b"\xe9"))
  return csv_path
