"""Classification heads: angular margins, the class-sharded softmax, Partial FC sampling and the
centres' optimizer (center_optimizer: small Adam state, row-sparse updates)."""

from oclear_jax.heads.margins import arcface
from oclear_jax.heads.margins import combined_margin
from oclear_jax.heads.margins import cosface
from oclear_jax.heads.margins import make_margin
from oclear_jax.heads.margins import MarginFn
from oclear_jax.heads.sharded_softmax import margin_softmax_loss
from oclear_jax.heads.class_shards import num_class_shards
from oclear_jax.heads.partial_fc import num_sampled_classes
from oclear_jax.heads.class_shards import pad_num_classes
from oclear_jax.heads.partial_fc import sample_class_rows
from oclear_jax.heads.partial_fc import sample_classes

__all__ = [
    "MarginFn",
    "arcface",
    "combined_margin",
    "cosface",
    "make_margin",
    "margin_softmax_loss",
    "num_class_shards",
    "num_sampled_classes",
    "pad_num_classes",
    "sample_class_rows",
    "sample_classes",
]
