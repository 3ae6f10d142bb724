"""`config.governance` as a frozen, validated dataclass.

Beam pickles whatever a pass needs onto its workers; a small frozen dataclass travels better than
a ConfigDict and cannot be changed half-way through a run. Validation happens once, here, and
names the config key to fix. The fields have no defaults: every value comes from a config, whose
defaults live in `config_schema.base_config()` alone (`from_config`; `defaults` for the schema's).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from oclear_jax import config_schema

IMAGE_FEATURES = ("efficientnet_lite0", "pixels")
EXECUTORS = ("beam", "in_process")
CATEGORIES = ("raw", "product")


@dataclasses.dataclass(frozen=True)
class GovernanceSettings:
  """`config.governance`, field for field; `config_schema.base_config()` documents and sets each one."""
  splits: tuple[str, ...]
  kinds: tuple[str, ...]
  image_features: str
  image_size: int
  batch_size: int
  feature_cache: str
  title_features: bool
  pca_dims: int
  shrinkage: float
  rounds: int
  executor: str
  beam_runner: str
  beam_options: str
  chunk_size: int
  dedupe: bool
  phash_max_bits: int
  dup_min_cosine: float
  dup_title_jaccard: float
  split: bool
  split_min_part: int
  split_min_effect: float
  split_max_parts: int
  split_max_items: int
  merge: bool
  merge_neighbours: int
  merge_max_distance: float
  outliers: bool
  score_candidates: int
  outlier_margin: float
  outlier_max_distance: float
  long_tail: bool
  min_category_size: int
  max_category_size: int
  balance_power: float
  report_examples: int
  categories: str
  extra_catalogues: tuple[str, ...]
  eval_sources: tuple[str, ...]
  val_fraction: float
  eval_fraction: float
  variant_min_tokens: int
  heldout_min_rows: int

  def __post_init__(self):
    for name in ("splits", "kinds", "extra_catalogues", "eval_sources"):
      value = getattr(self, name)
      object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
    checks = [
        (self.image_features in IMAGE_FEATURES, f"image_features={self.image_features!r}: use one of {IMAGE_FEATURES}"),
        (self.executor in EXECUTORS, f"executor={self.executor!r}: use one of {EXECUTORS}"),
        (self.image_size >= 32, f"image_size={self.image_size} must be >= 32"),
        (self.pca_dims >= 2, f"pca_dims={self.pca_dims} must be >= 2"),
        (0.0 <= self.shrinkage <= 1.0, f"shrinkage={self.shrinkage} must lie in [0, 1]"),
        (self.rounds >= 1, f"rounds={self.rounds} must be >= 1"),
        (self.chunk_size >= 1 and self.batch_size >= 1, "chunk_size and batch_size must be >= 1"),
        (0 <= self.phash_max_bits <= 64, f"phash_max_bits={self.phash_max_bits} must lie in [0, 64]"),
        (self.split_min_part >= 1 and self.split_max_parts >= 2, "need split_min_part >= 1, split_max_parts >= 2"),
        (self.merge_neighbours >= 1, f"merge_neighbours={self.merge_neighbours} must be >= 1"),
        (self.score_candidates >= 1, f"score_candidates={self.score_candidates} must be >= 1"),
        (self.merge_max_distance > 0 and self.outlier_max_distance > 0, "distances must be positive"),
        (0 <= self.outlier_margin < 1, f"outlier_margin={self.outlier_margin} must lie in [0, 1)"),
        (self.min_category_size >= 1, f"min_category_size={self.min_category_size} must be >= 1"),
        (self.max_category_size >= 0, f"max_category_size={self.max_category_size} must be >= 0 (0 = no cap)"),
        (self.balance_power >= 0, f"balance_power={self.balance_power} must be >= 0 (0 = uniform)"),
        (bool(self.splits) and bool(self.kinds), "splits and kinds must name at least one split and kind"),
        (self.categories in CATEGORIES, f"categories={self.categories!r}: use one of {CATEGORIES}"),
        (self.val_fraction >= 0 and self.eval_fraction >= 0 and self.val_fraction + self.eval_fraction <= 1,
         f"val_fraction={self.val_fraction}, eval_fraction={self.eval_fraction}: need >= 0 with a sum <= 1"),
        (self.variant_min_tokens >= 1, f"variant_min_tokens={self.variant_min_tokens} must be >= 1"),
        (self.heldout_min_rows >= 1, f"heldout_min_rows={self.heldout_min_rows} must be >= 1"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"config.governance.{message}")


def from_config(governance: ml_collections.ConfigDict, **overrides) -> GovernanceSettings:
  """`config.governance` (every field, as a config merged onto the schema has), with `overrides`."""
  values = {**governance.to_dict(), **overrides}
  known = {f.name for f in dataclasses.fields(GovernanceSettings)}
  unknown, missing = sorted(set(values) - known), sorted(known - set(values))
  if unknown:
    raise ValueError(f"config.governance has unknown fields {unknown}; known: {sorted(known)}")
  if missing:
    raise ValueError(f"config.governance lacks fields {missing}: build it from config_schema.base_config()")
  return GovernanceSettings(**values)


def defaults(**overrides) -> GovernanceSettings:
  """The schema's defaults (`config_schema.base_config().governance`) with `overrides`, e.g. in tests."""
  return from_config(config_schema.base_config().governance, **overrides)
