"""`config.governance` as a frozen, validated dataclass.

Beam pickles whatever a pass needs onto its workers; a small frozen dataclass travels better than
a ConfigDict and cannot be changed half-way through a run. Validation happens once, here, and
names the config key to fix.
"""
from __future__ import annotations

import dataclasses

import ml_collections

IMAGE_FEATURES = ("efficientnet_lite0", "pixels")
EXECUTORS = ("beam", "in_process")
CATEGORIES = ("raw", "product")


@dataclasses.dataclass(frozen=True)
class GovernanceSettings:
  """See `config_schema.base_config()` (section `governance`) for what each field means."""
  splits: tuple[str, ...] = ("train",)
  kinds: tuple[str, ...] = ("doc",)
  image_features: str = "efficientnet_lite0"
  image_size: int = 64
  batch_size: int = 64
  feature_cache: str = ""
  title_features: bool = True
  pca_dims: int = 128
  shrinkage: float = 0.1
  rounds: int = 3
  executor: str = "beam"
  beam_runner: str = "DirectRunner"
  beam_options: str = ""
  chunk_size: int = 1024
  dedupe: bool = True
  phash_max_bits: int = 4
  dup_min_cosine: float = 0.85
  dup_title_jaccard: float = 0.9
  split: bool = True
  split_min_part: int = 2
  split_min_effect: float = 0.25
  split_max_parts: int = 4
  split_max_items: int = 2000
  merge: bool = True
  merge_neighbours: int = 10
  merge_max_distance: float = 2.0
  outliers: bool = True
  outlier_margin: float = 0.2
  outlier_max_distance: float = 4.0
  long_tail: bool = True
  min_category_size: int = 2
  max_category_size: int = 0
  balance_power: float = 0.5
  report_examples: int = 8
  categories: str = "raw"
  extra_catalogues: tuple[str, ...] = ()
  eval_sources: tuple[str, ...] = ()
  val_fraction: float = 0.1
  eval_fraction: float = 0.2
  variant_min_tokens: int = 2
  heldout_min_rows: int = 1

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


def from_config(governance: ml_collections.ConfigDict) -> GovernanceSettings:
  values = governance.to_dict()
  known = {f.name for f in dataclasses.fields(GovernanceSettings)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"config.governance has unknown fields {unknown}; known: {sorted(known)}")
  return GovernanceSettings(**values)
