r"""The real Myntra catalogue sample (../shared/data/fashion_small12k): articleType categories.

  python -m oclear_jax.main --config=configs/fashion.py --workdir=workdirs/fashion
  python -m oclear_jax.main --config=configs/fashion.py:/path/to/catalogue --workdir=...
  python -m oclear_jax.main --config=configs/fashion.py:frozen --workdir=workdirs/fashion_frozen

The CSV has no query/doc or split columns: every row is a catalogue document, categories are
split class-disjointly (held-out articleTypes only at evaluation), and evaluation is
leave-one-out (each held-out image queries all other held-out documents).

`frozen` (optionally `frozen,/path/to/catalogue`): the pretrained towers from wheels
(EfficientNet-Lite0 ImageNet at 224 px, MiniLM-L6), frozen, so only the query/doc heads, the
fusion and the class centres train, on the records (the towers run at every step; add
`--config.data.input=tower_features` to train on their cached outputs). The articleType-level
baseline of benchmarks/fusion_ablation.py; the recommended real-data model is
configs/fashion_products.py (same-product categories).
"""
import os

from oclear_jax import config_schema

DEFAULT_ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "fashion_small12k"))
IMAGE_SIZE = 224  # Myntra's photos are 60x80 .. 1800x2400; Lite0 was trained at 224 px.


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  frozen = "frozen" in parts
  roots = [p for p in parts if p != "frozen"]
  c = config_schema.base_config()
  c.data.source = "csv"
  c.data.root = roots[0] if roots else DEFAULT_ROOT
  c.data.csv = "meta.csv"
  c.data.columns.update(dict(id="id", image="image", title="productDisplayName", label="articleType",
                             kind="", split=""))
  c.data.eval_fraction = 0.25
  c.data.vocab_size = 4000
  c.train.batch_size = 128
  c.train.num_steps = 1500
  c.train.checkpoint_every = 500
  if frozen:
    _frozen_towers(c)
  return c


def _frozen_towers(c) -> None:
  """Frozen wheel towers; heads, fusion and margin as chosen by the former fashion_retrieval benchmark.

  Shared heads: queries and documents are the same catalogue photos here, so one image head
  serves both and only the (gated) title term tells a document from its query. Title dropout
  0.5: with same-title classes a title names its class outright, and a document that leans on it
  teaches nothing an image-only query can follow on unseen categories.
  """
  m = c.model
  m.image_tower, m.text_tower = "efficientnet_lite0", "minilm"
  m.image_pretrained = m.text_pretrained = m.freeze_image_tower = m.freeze_text_tower = True
  m.fusion, m.shared_heads, m.title_dropout = "gated", True, 0.5
  m.embed_dim, m.head_hidden = 256, 1024
  c.data.tokenizer, c.data.max_title_len = "minilm", 16
  c.data.stored_image_size = IMAGE_SIZE
  c.data.train_preprocess = f"decode|random_resized_crop({IMAGE_SIZE})|flip_lr|value_range(-1, 1)"
  c.data.eval_preprocess = f"decode|resize({IMAGE_SIZE})|value_range(-1, 1)"
  c.train.batch_size = 256  # products; each is a query and a document: 512 rows in the softmax
  c.train.num_steps = 400
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-3, 40
  c.head.margin, c.head.scale, c.head.margin_value = "cosface", 30.0, 0.35
