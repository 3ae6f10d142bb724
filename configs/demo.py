r"""The `make demo` experiment: the built-in catalogue, a small OCLEAR model, CPU-sized.

  python -m oclear_jax.main --config=configs/demo.py --workdir=workdirs/demo

About 300 synthetic products (catalogue shots with noisy titles, separate shopper photos, skewed
class sizes, planted label noise); a 64 px ViT shared by queries and documents, query/doc heads,
a small title encoder with gated fusion, CosFace over class centres sharded on the mesh.
"""
from oclear_jax import config_schema


def get_config(arg: str | None = None):
  del arg
  c = config_schema.base_config()
  c.data.synthetic.num_products = 300
  c.data.synthetic.query_difficulty = 0.6  # 1.0 is the hard setting: heavy clutter at 64 px
  c.model.vit = "mu"
  c.model.patch_size = 8
  c.train.batch_size = 128
  c.train.num_steps = 600
  c.train.log_every = 25
  c.train.checkpoint_every = 300
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 50
  return c
