"""Reads a product catalogue CSV into validated rows.

A catalogue is a root directory with images and one CSV. Real catalogues name their
columns differently (the Myntra sample calls the title `productDisplayName` and has no
`kind` or `split` column), so the caller maps our fields to their column names with
`CatalogueColumns`. Everything downstream (governance, record writing) sees only
`CatalogueRow`s with absolute image paths and known kinds and splits.

Bad rows are common in scraped catalogues; the reader skips what cannot be used and
counts it by reason instead of failing, but it does fail -- naming the file, the line
and the fix -- on mistakes that would silently corrupt training (a misnamed column,
duplicate ids).
"""

import collections
import csv
import dataclasses
import hashlib
import io
import math
import os
import pathlib
from typing import Optional, Sequence

from input_pipeline import paths

KINDS = ("doc", "query")
SPLITS = ("train", "val", "eval")  # val: held-out training products (governance product mode)


@dataclasses.dataclass(frozen=True)
class CatalogueColumns:
  """Names of the CSV columns that hold each field; `kind`, `split` and `exposure` are optional.

  `title` and `label` may be None for catalogues that are only embedded (`--mode=embed`): no
  title column gives every row an empty title; no label column gives every row label ''.
  """
  id: str = "id"
  image: str = "image"
  title: Optional[str] = "title"
  label: Optional[str] = "label"
  kind: Optional[str] = None
  split: Optional[str] = None
  exposure: Optional[str] = None  # per-item exposure or click counts (governance keeps the most seen)
  colour: Optional[str] = None  # the product's colour (governance strips colour words from titles)


@dataclasses.dataclass(frozen=True)
class CatalogueRow:
  id: str
  image_path: str  # Absolute.
  title: str
  label: str  # The raw category id string from the CSV.
  kind: str  # 'doc' or 'query'.
  split: str  # 'train' or 'eval'.
  exposure: Optional[float] = None  # None without an exposure column; 0 where its value was unusable.
  colour: str = ""  # '' without a colour column.


@dataclasses.dataclass
class CatalogueReadResult:
  rows: list[CatalogueRow]
  counts: dict[str, int]
  # Rows skipped for an empty required field: {"line", "id", "image", "reason"} (reason as in counts).
  skipped: list[dict] = dataclasses.field(default_factory=list)


def label_in_eval(label: str, eval_fraction: float, split_seed: int) -> bool:
  """Class-disjoint split: a stable hash of (seed, label) decides, not Python's hash().

  Python's `hash` of a str is salted per process, so it would give a different split
  on every run; sha256 gives the same split on every machine.
  """
  digest = hashlib.sha256(f"{split_seed}\x00{label}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def _fix_non_utf8(value: str) -> tuple[str, bool]:
  """Turns surrogate-escaped bytes into U+FFFD; reports whether there were any."""
  if not any("\udc80" <= ch <= "\udcff" for ch in value):
    return value, False
  raw = value.encode("utf-8", errors="surrogateescape")
  return raw.decode("utf-8", errors="replace"), True


def _check_columns(csv_path: pathlib.Path, header: Sequence[str],
                   columns: CatalogueColumns) -> None:
  for field in dataclasses.fields(columns):
    name = getattr(columns, field.name)
    if name is not None and name not in header:
      raise ValueError(
          f"catalogue {csv_path} has no column {name!r} (columns: {', '.join(header)}); "
          f"set config.data.columns.{field.name}")


def _exposure(value: str) -> Optional[float]:
  """A non-negative finite count, or None."""
  try:
    number = float(value)
  except ValueError:
    return None
  return number if math.isfinite(number) and number >= 0 else None


def _checked_value(csv_path: pathlib.Path, line: int, field: str, value: str,
                   allowed: tuple[str, ...], columns: CatalogueColumns) -> str:
  value = value.strip().lower()
  if value not in allowed:
    raise ValueError(
        f"catalogue {csv_path} line {line}: {field} is {value!r}, expected one of "
        f"{allowed}; fix the value or set config.data.columns.{field}=None "
        f"(column {getattr(columns, field)!r})")
  return value


def open_text(csv_path: str):
  """The CSV as text; surrogateescape keeps undecodable bytes countable per row (see read_catalogue).
  A URL (gs://) is read through gfile's bytes, decoded the same way."""
  if not paths.is_remote(csv_path):
    return open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape")
  with paths.open(csv_path, "rb") as f:
    return io.StringIO(f.read().decode("utf-8-sig", "surrogateescape"), newline="")


def read_catalogue(csv_path: str | pathlib.Path,
                   columns: CatalogueColumns = CatalogueColumns(),
                   *,
                   eval_fraction: float = 0.2,
                   split_seed: int = 0,
                   max_rows: Optional[int] = None) -> CatalogueReadResult:
  """Reads and validates a catalogue CSV.

  Args:
    csv_path: the CSV; image paths in it are relative to its directory.
    columns: which CSV column holds each field.
    eval_fraction: without a split column, the fraction of labels (not rows) held
      out for eval, so that eval measures retrieval on unseen categories.
    split_seed: changes which labels go to eval.
    max_rows: read at most this many data rows (for smoke runs).

  Returns:
    The usable rows, the rows skipped for an empty id, image or label (with their line), and
    counts: rows_read, rows_kept, skipped_empty_{id,image,label}, non_utf8_rows, empty_titles,
    invalid_exposure (empty, non-numeric or negative values, read as 0; the row is kept), and
    kept rows per split and per kind.

  Raises:
    ValueError: on a missing column, duplicate ids or unknown kind/split values.
  """
  csv_path = paths.resolve(csv_path)  # gs://bucket/cat.csv stays a URL
  root = os.path.dirname(csv_path)
  counts = collections.Counter({
      "rows_read": 0, "rows_kept": 0, "skipped_empty_id": 0, "skipped_empty_image": 0,
      "skipped_empty_label": 0, "non_utf8_rows": 0, "empty_titles": 0, "invalid_exposure": 0,
      "train": 0, "val": 0, "eval": 0, "doc": 0, "query": 0})
  rows: list[CatalogueRow] = []
  skipped: list[dict] = []
  first_line_of_id: dict[str, int] = {}
  # surrogateescape keeps undecodable bytes recoverable so they can be counted per
  # row and replaced, rather than failing the whole file or silently mangling it.
  _check_text(csv_path)
  with open_text(csv_path) as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    _check_columns(csv_path, header, columns)
    for record in reader:
      if max_rows is not None and counts["rows_read"] >= max_rows:
        break
      counts["rows_read"] += 1
      line = reader.line_num
      had_bad_bytes = False
      fields = {}
      for field in dataclasses.fields(columns):
        name = getattr(columns, field.name)
        if name is None:
          continue
        value, bad = _fix_non_utf8(record.get(name) or "")
        had_bad_bytes |= bad
        fields[field.name] = value.strip()
      counts["non_utf8_rows"] += had_bad_bytes
      empty = [k for k in ("id", "image", "label") if k in fields and not fields[k]]
      if empty:
        counts[f"skipped_empty_{empty[0]}"] += 1
        skipped.append({"line": line, "id": fields["id"], "image": fields["image"],
                        "reason": f"empty_{empty[0]}"})
        continue
      row_id = fields["id"]
      if row_id in first_line_of_id:
        raise ValueError(
            f"catalogue {csv_path}: id {row_id!r} appears on line "
            f"{first_line_of_id[row_id]} and line {line}; ids must be unique, "
            "drop or rename one of the rows")
      first_line_of_id[row_id] = line
      label = fields.get("label", "")
      if columns.kind is not None:
        kind = _checked_value(csv_path, line, "kind", fields["kind"], KINDS, columns)
      else:
        kind = "doc"
      if columns.split is not None:
        split = _checked_value(csv_path, line, "split", fields["split"], SPLITS, columns)
      else:
        split = "eval" if label_in_eval(label, eval_fraction, split_seed) else "train"
      title = fields.get("title", "")
      counts["empty_titles"] += not title
      exposure = None
      if columns.exposure is not None:
        exposure = _exposure(fields["exposure"])
        counts["invalid_exposure"] += exposure is None
        exposure = exposure or 0.0
      image = fields["image"]
      image_path = image if os.path.isabs(image) or paths.is_remote(image) else paths.join(root, image)
      rows.append(CatalogueRow(id=row_id, image_path=str(image_path), title=title,
                               label=label, kind=kind, split=split, exposure=exposure,
                               colour=fields.get("colour", "")))
      counts["rows_kept"] += 1
      counts[split] += 1
      counts[kind] += 1
  if not counts["rows_read"] and max_rows != 0:
    raise ValueError(f"catalogue {csv_path} has no rows, only its header ({', '.join(header)}): nothing to read")
  return CatalogueReadResult(rows=rows, counts=dict(counts), skipped=skipped)


def _check_text(csv_path: str) -> None:
  """A binary file given as the CSV (an image, an archive) is refused by name, its bytes never printed."""
  with paths.open(csv_path, "rb") as f:
    head = f.read(8192)
  nul = head.find(b"\x00")
  if nul >= 0:
    raise ValueError(f"catalogue {csv_path} is not a CSV file: it holds binary data (a NUL byte at byte {nul}); "
                     f"pass the catalogue's .csv")
