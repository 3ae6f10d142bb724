r"""The real Myntra catalogue sample (../shared/data/fashion_small12k): articleType categories.

  python -m oclear_jax.main --config=configs/fashion.py --workdir=workdirs/fashion
  python -m oclear_jax.main --config=configs/fashion.py:/path/to/catalogue --workdir=...

The CSV has no query/doc or split columns: every row is a catalogue document, categories are
split class-disjointly (held-out articleTypes only at evaluation), and evaluation is
leave-one-out (each held-out image queries all other held-out documents).
"""
import os

from oclear_jax import config_schema

DEFAULT_ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "fashion_small12k"))


def get_config(arg: str | None = None):
  c = config_schema.base_config()
  c.data.source = "csv"
  c.data.root = arg or DEFAULT_ROOT
  c.data.csv = "meta.csv"
  c.data.columns.update(dict(id="id", image="image", title="productDisplayName", label="articleType",
                             kind="", split=""))
  c.data.eval_fraction = 0.25
  c.data.vocab_size = 4000
  c.train.batch_size = 128
  c.train.num_steps = 1500
  c.train.checkpoint_every = 500
  return c
