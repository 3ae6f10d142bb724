"""The decision log and the category map: what happened to every item and every raw label, and why.

Nothing leaves the catalogue without a row here. Per item: the raw label, the curated category
('' when dropped), the action (kept / relabelled / dropped), the step that decided it and a
sentence saying why, with the distances that decided it. Per raw label: the curated category (or
categories, when split) and the reason (kept, merged with ..., split into ..., long tail ...).
"""
from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence

KEPT, RELABELLED, DROPPED = "kept", "relabelled", "dropped"
ACTIONS = (KEPT, RELABELLED, DROPPED)
STEPS = ("passthrough", "featurize", "split", "merge", "outliers", "long_tail", "duplicates", "head_cap", "follow",
         "product_categories", "product_split")  # the last two: categories="product" (product_govern.py)
DECISION_COLUMNS = ("id", "kind", "split", "raw_label", "category", "action", "step", "reason", "own_distance",
                    "nearest_distance")
CURATED_COLUMNS = ("id", "image", "title", "label", "kind", "split")
CATEGORY_MAP_COLUMNS = ("raw_label", "category", "items", "kept", "relabelled_away", "dropped", "reason")


@dataclasses.dataclass
class ItemDecision:
  id: str
  kind: str
  split: str
  raw_label: str
  category: str = ""
  action: str = KEPT
  step: str = ""
  reasons: list[str] = dataclasses.field(default_factory=list)
  own_distance: float = float("nan")
  nearest_distance: float = float("nan")
  outlier: bool = False  # flagged by the outlier step, whatever later steps did

  def set(self, action: str, step: str, reason: str, category: str | None = None) -> None:
    self.action, self.step = action, step
    self.reasons.append(reason)
    if category is not None:
      self.category = category
    if action == DROPPED:
      self.category = ""

  @property
  def reason(self) -> str:
    return "; ".join(self.reasons) if self.reasons else "kept"


def _csv_lines(rows: Sequence[Sequence]) -> str:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="\n").writerows(rows)
  return buffer.getvalue()


def format_chunk(chunk: tuple[list, list[ItemDecision]]) -> tuple[str, str]:
  """The record-writing pass over one chunk: (curated catalogue CSV lines, decision log CSV lines).

  `chunk` holds the catalogue rows (input_pipeline.catalogue.CatalogueRow) and their decisions.
  """
  rows, decisions = chunk
  curated, log = [], []
  for row, d in zip(rows, decisions):
    if d.action != DROPPED:
      curated.append((row.id, row.image_path, row.title, d.category, row.kind, row.split))
    log.append((d.id, d.kind, d.split, d.raw_label, d.category, d.action, d.step, d.reason,
                "" if d.own_distance != d.own_distance else f"{d.own_distance:.4f}",
                "" if d.nearest_distance != d.nearest_distance else f"{d.nearest_distance:.4f}"))
  return _csv_lines(curated), _csv_lines(log)


def header(columns: Sequence[str]) -> str:
  return _csv_lines([columns])


def read_csv(path: str) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))
