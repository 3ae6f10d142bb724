r"""The `make demo` experiment: the built-in catalogue, OCLEAR on pretrained towers, CPU-sized.

  python -m oclear_jax.main --config=configs/demo.py --workdir=workdirs/demo

About 300 synthetic products (catalogue shots with noisy titles, separate shopper photos, skewed
class sizes, planted label noise). The recipe of configs/fashion_products.py at demo size: the
pretrained towers from wheels (EfficientNet-Lite0 ImageNet, MiniLM-L6), frozen, their outputs
cached once; query and document heads started at the identity (step 0 is the frozen tower), a
gated title term started at zero, CosFace over class centres sharded on the mesh. The table shows
the frozen pretrained tower, step 0 and the trained model on the same held-out queries.

`demo.py:vit` is the from-scratch variant: a 64 px ViT, query/doc heads and a small title encoder
trained end to end on the records (no pretrained weights).
"""
from oclear_jax import config_schema


def get_config(arg: str | None = None):
  c = config_schema.base_config()
  c.data.synthetic.num_products = 300
  c.data.synthetic.query_difficulty = 0.6  # 1.0 is the hard setting: heavy clutter at 64 px
  c.train.log_every = 25
  c.optimizer.warmup_steps = 50
  if arg == "vit":
    c.model.vit = "mu"
    c.model.patch_size = 8
    c.train.batch_size, c.train.num_steps, c.train.checkpoint_every = 128, 600, 300
    c.optimizer.learning_rate = 2e-3
    return c
  if arg:
    raise ValueError(f"configs/demo.py:{arg}: unknown variant; use demo.py or demo.py:vit")
  m = c.model
  m.image_tower, m.text_tower = "efficientnet_lite0", "minilm"
  m.image_pretrained = m.text_pretrained = m.freeze_image_tower = m.freeze_text_tower = True
  m.head, m.embed_dim = "identity_linear", 1280
  m.fusion, m.title_dropout = "bounded", 0.5
  c.data.tokenizer, c.data.max_title_len = "minilm", 16
  c.data.stored_image_size = 128  # the 64 px renders, upsampled: Lite0's 5 strides leave a 4x4 map
  c.data.eval_preprocess = "decode|resize(128)|value_range(-1, 1)"
  c.data.train_preprocess = "decode|random_resized_crop(128)|flip_lr|color_jitter|value_range(-1, 1)"
  c.data.input = "tower_features"
  c.data.balanced_sampling = False  # records only; also on governed categories (colab/quickstart.ipynb)
  c.head.margin_value = 0.2
  c.train.batch_size, c.train.num_steps, c.train.checkpoint_every = 256, 400, 200
  c.optimizer.learning_rate = 1e-3
  return c
