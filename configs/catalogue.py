r"""Any retailer's catalogue CSV: OCLEAR's recommended recipe, pointed at the file by its argument.

  python -m oclear_jax.main --config=configs/catalogue.py:DIR/meta.csv --workdir=W \
      [--config.data.columns.title=name --config.data.columns.label=type --config.data.columns.colour=colour]
  python -m oclear_jax.main --mode=evaluate --workdir=W                                # its held-out products
  python -m oclear_jax.main --mode=evaluate --config=configs/catalogue.py:DIR/meta.csv \
      --catalogue=DIR/meta.csv --output=OUT                                           # the frozen towers alone

The CSV needs an id, an image path (relative to the CSV's folder) and a title per row; a label
(coarse product type, `columns.label`) and a colour column are optional ('' = absent). Governance
turns the rows into same-product categories (`governance.categories='product'`: same titles, colour
variants, single products), split by category with a validation split of training products; the
frozen towers' outputs (EfficientNet-Lite0 ImageNet at 224 px, MiniLM-L6 titles) are cached once,
and the heads, the bounded title term, title matching and the class centres train on them.
`configs/fashion_products.py` documents why each choice (benchmarks/real_retrieval.py measures them).
"""
import os

from oclear_jax import config_schema

IMAGE_SIZE = 224


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError("configs/catalogue.py needs the catalogue CSV: --config=configs/catalogue.py:DIR/meta.csv")
  csv_path = os.path.abspath(os.path.expanduser(arg))
  c = config_schema.base_config()
  # == Catalogue -> product categories (governance) -> records ==
  d = c.data
  d.source, d.root, d.csv = "csv", os.path.dirname(csv_path), os.path.basename(csv_path)
  d.columns.update(dict(id="id", image="image", title="title", label="", kind="", split="", colour=""))
  d.governed = True
  d.balanced_sampling = False  # not with cached features; the categories are small and many already
  g = c.governance
  g.categories = "product"
  g.val_fraction, g.eval_fraction = 0.1, 0.2
  g.executor = "in_process"
  d.tokenizer, d.max_title_len = "minilm", 16
  d.stored_image_size = IMAGE_SIZE
  d.eval_preprocess = f"decode|resize({IMAGE_SIZE})|value_range(-1, 1)"
  d.train_preprocess = f"decode|random_resized_crop({IMAGE_SIZE})|flip_lr|value_range(-1, 1)"
  d.input = "tower_features"
  # == Model: frozen pretrained towers, identity-started heads, bounded title term ==
  m = c.model
  m.image_tower, m.text_tower = "efficientnet_lite0", "minilm"
  m.image_pretrained = m.text_pretrained = m.freeze_image_tower = m.freeze_text_tower = True
  m.head, m.embed_dim = "identity_linear", 1280
  m.shared_heads = True  # queries and documents are the same kind of photo here
  m.fusion, m.title_dropout = "bounded", 0.5
  m.title_match_dim, m.title_match_weight = 256, 0.5
  # == Learning by classification ==
  c.head.margin, c.head.scale, c.head.margin_value = "cosface", 30.0, 0.2
  c.train.batch_size, c.train.num_steps = 512, 600
  c.train.checkpoint_every, c.train.log_every = 100, 50
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-3, 50
  # == Evaluation: checkpoint chosen on training products' val split ==
  c.eval.select_on, c.eval.every = "val", 100
  c.eval.batch_size = 256
  # Titles at search time too: the titles of each query's top 3 results re-rank the rest (prf/ rows).
  c.eval.title_feedback_docs = 3
  return c
