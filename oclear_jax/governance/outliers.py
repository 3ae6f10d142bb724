"""Outliers: items far from their category, relabelled to the nearest category or dropped.

An item is a candidate when, in whitened units (category_stats.py),
  * another category is nearer than its own by more than the fraction `outlier_margin` of its own
    distance (a wrong label: the nearest-centroid rule of linear discriminant analysis, with a
    relative margin for broad categories that overlap: an item far from its own category needs a
    proportionally clearer alternative; on the Myntra sample the ratio separates planted wrong
    labels from near-synonym articleTypes such as Sandals / Flip Flops better than a fixed gap), or
  * its own category is farther than `outlier_max_distance` (junk that fits its label badly).
A category's identity is its majority, so per round at most max(1, n // 2) of its n members
are flagged, the most confident first; the next round re-fits the space and centroids without them
and looks again. This keeps a small label whose centroid is pulled by a wrong member from
flagging its correct members instead.

Decision for a flagged item: relabel to the nearest category when it fits there (distance at most
`outlier_max_distance`), else drop it as an outlier; a singleton (no own distance) is never an
outlier of itself.
"""
from __future__ import annotations

import numpy as np

from oclear_jax.governance import executors
from oclear_jax.governance import settings as settings_lib

RELABEL, DROP, KEEP = "relabel", "drop", "keep"


def _nearer_elsewhere(scores: dict[str, np.ndarray], settings: settings_lib.GovernanceSettings) -> np.ndarray:
  return scores["best"] < scores["own"] * (1.0 - settings.outlier_margin)


def flag(scores: dict[str, np.ndarray], categories: np.ndarray, settings: settings_lib.GovernanceSettings,
         executor, clear_only: bool = False) -> np.ndarray:
  """bool[n]: the items treated as untrusted in the next round (and the final candidates).

  `scores` are category_stats.item_scores' distances. `clear_only` (the first, cleaning round) keeps
  only candidates that also misfit their own category (own distance above `merge_max_distance`):
  members of a label split in two halves sit nearer the other half's centroid about half the time,
  yet fit their own label well, and must stay trusted for the merge to see two equal halves.
  Each category's quota is filled where its members land: a pass keyed by category (executors.py).
  """
  own = scores["own"]
  defined = np.isfinite(own)
  candidate = defined & (_nearer_elsewhere(scores, settings) | (own > settings.outlier_max_distance))
  if clear_only:
    candidate &= own > settings.merge_max_distance
  confidence = np.where(defined, scores["best"] - own, np.inf)  # Most negative = the clearest case.
  parts = executors.row_chunks(len(own), settings.chunk_size)
  chunks = ((part, categories[part], candidate[part], confidence[part]) for part in parts)
  found = executor.group_by_key("outliers", _emit_by_category, _clearest, chunks, sizes=[len(p) for p in parts])
  flagged = np.zeros(len(own), bool)
  for positions in found:
    flagged[positions] = True
  return flagged


def _emit_by_category(chunk):
  """(positions, categories, candidate, confidence) of a chunk -> (category, (confidence, position, candidate))."""
  positions, categories, candidate, confidence = chunk
  for k in range(len(positions)):
    yield int(categories[k]), (float(confidence[k]), int(positions[k]), bool(candidate[k]))


def _clearest(category: int, members) -> list[int] | None:  # pylint: disable=unused-argument
  """A category's flagged positions: its clearest candidates, ties by position, at most max(1, n // 2) of
  its n members (a category's identity is its majority)."""
  quota = max(1, len(members) // 2)
  clearest = sorted((confidence, position) for confidence, position, is_candidate in members if is_candidate)
  return [position for _, position in clearest[:quota]] or None


def decide(flagged: np.ndarray, scores: dict[str, np.ndarray], settings: settings_lib.GovernanceSettings
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(action str[n]: RELABEL, DROP or KEEP; target category i64[n]; its distance f64[n]).

  A flagged item goes to its nearest other category when it fits there, else it is dropped.
  """
  target, distance = scores["best_category"], scores["best"]
  fits = distance <= settings.outlier_max_distance
  return np.where(flagged & fits, RELABEL, np.where(flagged, DROP, KEEP)), target, distance
