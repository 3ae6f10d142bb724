r"""The recommended real-data model: OCLEAR over same-product categories of a real catalogue.

  python -m oclear_jax.main --config=configs/fashion_products.py --workdir=workdirs/products

One command: the first run governs the catalogue into product categories (`--mode=govern` with
governance.categories='product': same titles, colour variants, single products; both Myntra folders,
split by category so no product is on both sides; evaluation only on the full-resolution folder),
writes the records, caches the frozen towers' outputs (EfficientNet-Lite0 ImageNet at 224 px,
MiniLM-L6 titles) and trains the heads, the title fusion and the class centres on them. The eval
table puts the frozen pretrained tower's row beside step 0 and the trained model, on the same
held-out queries and gallery; the checkpoint is chosen on a validation split of *training*
products (split='val', never the eval split), in checkpoints_best/.

Why these choices (benchmarks/real_retrieval.py measures them):
- head='identity_linear', embed_dim=1280: step 0 is the frozen tower exactly, and a linear map
  trained from there only moves what the product categories ask for; a random MLP head starts
  from nothing and ends below the frozen features on unseen products.
- fine-grained categories (about 15k, most of them single products or colour-variant groups) instead
  of ~140 articleTypes: what retrieval of the same product needs.
- titles enter documents through a bounded term, unit(image) + a * unit(title projection) with one
  learned scalar a that starts at zero (fusion='bounded'), and are dropped for half the training
  documents, so an untitled document stays a good embedding. A per-dimension gate (fusion='gated')
  let the title grow into a lookup of the training categories and made held-out documents worse
  than their images alone; bounded, image+title documents beat image-only ones at the product
  levels (benchmarks/real_retrieval.py).
- title matching (model.title_match_dim=256, weight 0.5; models/title_match.py): the query photo also
  says which title it expects, G(photo), trained against the batch's titles, and a document carries
  F(its title), so query . doc adds cos(G(photo), F(title)) to the image similarity. The bounded
  term above can only move a document toward its own image; this is how a title reaches an
  image-only query (benchmarks/real_retrieval.py, rows oclear and oclear_no_match).

Scale up on an accelerator by overrides, e.g. `--config.data.input=records
--config.model.freeze_image_tower=False` fine-tunes the whole tower end to end on the records.
`fashion_products.py:ROOT` reads another copy of the two folders' parent directory. The recipe
itself is `configs/catalogue.py` (any retailer's CSV); this file points it at the Myntra folders.
"""
import os

from configs import catalogue

DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config(arg: str | None = None):
  data_root = arg or DATA
  c = catalogue.get_config(os.path.join(data_root, "fashion_small12k", "meta.csv"))
  c.data.columns.update(dict(title="productDisplayName", label="articleType", colour="baseColour"))
  g = c.governance
  g.extra_catalogues = (os.path.join(data_root, "fashion_thumbs32k", "meta.csv"),)
  g.eval_sources = ("fashion_small12k",)  # full resolution only: the thumbnails are 60x80
  return c
