r"""Seconds-long smoke config used by the tests (and as a template for new experiments).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m oclear_jax.main --config=configs/tiny.py --workdir=/tmp/oclear_tiny

Overrides go on the command line, e.g. `--config.train.num_steps=50 --config.mesh.shape='(4, 2)'`.
"""
from oclear_jax import config_schema


def get_config(arg: str | None = None):
  del arg
  c = config_schema.base_config()
  c.data.synthetic.update(dict(num_products=48, queries_per_product=2, image_size=32, query_difficulty=0.3,
                               wrong_label_fraction=0.0, split_product_fraction=0.0))
  c.data.stored_image_size = 32
  c.data.num_shards = 2
  c.data.vocab_size = 300
  c.data.max_title_len = 16
  c.data.train_preprocess = "decode|random_resized_crop(32)|flip_lr|value_range(-1, 1)"
  c.data.eval_preprocess = "decode|resize(32)|value_range(-1, 1)"
  c.model.vit = "nano"
  c.model.patch_size = 8
  c.model.text.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  c.model.embed_dim = 32
  c.model.head_hidden = 64
  c.mesh.shape = (4, 2)
  c.train.batch_size = 32
  c.train.num_steps = 40
  c.train.log_every = 10
  c.train.checkpoint_every = 20
  c.optimizer.warmup_steps = 5
  c.optimizer.learning_rate = 3e-3
  c.eval.batch_size = 32
  c.eval.scann = True
  c.eval.contact_sheet_queries = 3
  return c
