"""A seeded synthetic product catalogue with planted noise and its ground truth.

The project's built-in data: products drawn from attributes (`synthetic_products`),
rendered as clean catalogue shots plus distorted shopper photos (`synthetic_render`),
written in the same on-disk format a real catalogue uses, so every downstream stage
(reading, governance, records, training, evaluation) runs on it unchanged:

  root/images/{id}.jpg|png
  root/catalogue.csv     id,image,title,label,kind,split  (label is the NOISY label)
  root/ground_truth.csv  id,product,true_label,noise  (noise: ''/wrong_label;split_id;...)
  root/catalogue.json    the spec and counts; its presence marks a complete catalogue

Real catalogues are messy, so the train split carries planted noise of known kinds
(wrong labels, products split across two ids, near-duplicate rows, corrupt files,
empty titles) recorded in ground_truth.csv; data-cleaning code can be tested against
it. Eval rows are clean and their products disjoint from train, so eval numbers
measure retrieval of unseen products and are not blurred by the noise.

Here each product is one clean label, so `product` and `true_label` coincide; they are
separate columns so that a curated real catalogue can share the format.

Same spec -> byte-identical output: products and noise are planned from
`default_rng(seed)` and each product is rendered from its own
`default_rng([seed, product_index])`.
"""

import argparse
import collections
import csv
import dataclasses
import io
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image
import tqdm

from input_pipeline import synthetic_products
from input_pipeline import synthetic_render

# Bump when the output for a given spec changes, so stale catalogues are not reused.
GENERATOR_VERSION = 1
CATALOGUE_COLUMNS = ("id", "image", "title", "label", "kind", "split")
GROUND_TRUTH_COLUMNS = ("id", "product", "true_label", "noise")
NOISE_KINDS = ("wrong_label", "split_id", "near_duplicate", "corrupt", "empty_title")
_PNG_DOC_FRACTION = 0.15  # Some catalogue images are PNG, as in real catalogues.


@dataclasses.dataclass(frozen=True)
class CatalogueSpec:
  """Everything that determines a synthetic catalogue (see the module docstring).

  Class sizes: each product gets a uniform draw from `docs_per_product`, raised for a
  few head products by a Zipf law over a random product ranking
  (`max_docs_per_product * rank ** -zipf_exponent`), so a handful of products own many
  rows as in real catalogues. Noise fractions apply to the train split only.
  """
  num_products: int = 300
  docs_per_product: tuple[int, int] = (2, 6)
  zipf_exponent: float = 1.1
  max_docs_per_product: int = 40
  queries_per_product: int = 2
  image_size: int = 64
  eval_fraction: float = 0.2
  seed: int = 0
  query_difficulty: float = 1.0
  wrong_label_fraction: float = 0.05  # Of train doc rows.
  split_product_fraction: float = 0.05  # Of train products.
  near_duplicate_fraction: float = 0.03  # Extra rows, per train doc row.
  corrupt_fraction: float = 0.0  # Of train rows, docs and queries.
  empty_title_fraction: float = 0.02  # Of train doc rows.

  def __post_init__(self):
    object.__setattr__(self, "docs_per_product", tuple(int(v) for v in self.docs_per_product))
    lo, hi = self.docs_per_product
    if self.num_products < 2:
      raise ValueError(f"num_products={self.num_products}: need at least 2")
    if not 1 <= lo <= hi <= self.max_docs_per_product:
      raise ValueError(f"need 1 <= docs_per_product[0] <= docs_per_product[1] <= "
                       f"max_docs_per_product, got {self.docs_per_product} and "
                       f"{self.max_docs_per_product}")
    if self.queries_per_product < 0 or self.image_size < 16:
      raise ValueError("need queries_per_product >= 0 and image_size >= 16")
    for name in ("eval_fraction", "wrong_label_fraction", "split_product_fraction",
                 "near_duplicate_fraction", "corrupt_fraction", "empty_title_fraction"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")

  def to_json(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class _Row:
  product: int
  kind: str  # 'doc' or 'query'.
  split: str
  label: str
  variant: int = 0  # Index among the product's base docs or queries.
  source: "_Row | None" = None  # For near-duplicates: the row copied.
  noise: set[str] = dataclasses.field(default_factory=set)
  id: str = ""
  ext: str = "jpg"
  title: str = ""


def _class_sizes(spec: CatalogueSpec, rng: np.random.Generator) -> np.ndarray:
  lo, hi = spec.docs_per_product
  body = rng.integers(lo, hi + 1, size=spec.num_products)
  ranks = rng.permutation(spec.num_products) + 1
  head = np.floor(spec.max_docs_per_product * ranks.astype(np.float64)**-spec.zipf_exponent)
  return np.clip(np.maximum(body, head), lo, spec.max_docs_per_product).astype(int)


def _choose(rng: np.random.Generator, items: list, count: float) -> list:
  """`round(count)` distinct items (at most all of them), in their original order."""
  count = min(len(items), int(round(count)))
  return [items[i] for i in sorted(rng.choice(len(items), size=count, replace=False))]


def _plan_rows(spec: CatalogueSpec, products: list[synthetic_products.Product],
               rng: np.random.Generator) -> list[_Row]:
  """Decides every row, its split, label and planted noise; draws no pixels."""
  sizes = _class_sizes(spec, rng)
  n_eval = int(round(spec.eval_fraction * spec.num_products))
  eval_products = set(rng.choice(spec.num_products, size=n_eval, replace=False).tolist())
  rows = []
  for p in products:
    split = "eval" if p.index in eval_products else "train"
    rows += [_Row(p.index, "doc", split, p.product_id, variant=j) for j in range(sizes[p.index])]
    rows += [_Row(p.index, "query", split, p.product_id, variant=j)
             for j in range(spec.queries_per_product)]
  train_docs = [r for r in rows if r.kind == "doc" and r.split == "train"]
  for source in _choose(rng, train_docs, spec.near_duplicate_fraction * len(train_docs)):
    rows.append(_Row(source.product, "doc", "train", source.label, source=source,
                     noise={"near_duplicate"}))
  train_docs = [r for r in rows if r.kind == "doc" and r.split == "train"]
  docs_of = collections.defaultdict(list)
  for row in train_docs:
    docs_of[row.product].append(row)
  splittable = sorted(p for p, docs in docs_of.items() if len(docs) >= 2)
  for p in _choose(rng, splittable, spec.split_product_fraction * len(docs_of)):
    docs = docs_of[p]
    for i in rng.choice(len(docs), size=len(docs) // 2, replace=False):
      docs[i].label = products[p].product_id + "b"
      docs[i].noise.add("split_id")
  train_products = sorted(docs_of)
  if len(train_products) > 1:
    unsplit = [r for r in train_docs if "split_id" not in r.noise]
    for row in _choose(rng, unsplit, spec.wrong_label_fraction * len(train_docs)):
      other = row.product
      while other == row.product:
        other = train_products[rng.integers(len(train_products))]
      row.label = products[other].product_id
      row.noise.add("wrong_label")
  for row in _choose(rng, train_docs, spec.empty_title_fraction * len(train_docs)):
    row.noise.add("empty_title")
  # Near-duplicate sources stay readable, so each near-duplicate has its original.
  sources = {id(r.source) for r in rows if r.source is not None}
  train_rows = [r for r in rows if r.split == "train"]
  corruptible = [r for r in train_rows if id(r) not in sources]
  for row in _choose(rng, corruptible, spec.corrupt_fraction * len(train_rows)):
    row.noise.add("corrupt")
  # Shuffle before numbering so ids say nothing about product or noise.
  rows = [rows[i] for i in rng.permutation(len(rows))]
  counters = collections.Counter()
  for row in rows:
    prefix = "d" if row.kind == "doc" else "q"
    row.id = f"{prefix}{counters[row.kind]:06d}"
    counters[row.kind] += 1
    if row.kind == "doc" and rng.random() < _PNG_DOC_FRACTION:
      row.ext = "png"
  return rows


def _encode(image: Image.Image, ext: str) -> bytes:
  buffer = io.BytesIO()
  if ext == "png":
    image.save(buffer, format="PNG")
  else:
    image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _corrupt(data: bytes, rng: np.random.Generator) -> bytes:
  """Garbage bytes or a truncated file: the two ways scraped images usually break."""
  if rng.random() < 0.5:
    return rng.integers(0, 256, size=max(16, len(data) // 2), dtype=np.uint8).tobytes()
  return data[:max(8, len(data) // 4)]


def _render_product(spec: CatalogueSpec, product: synthetic_products.Product,
                    rows: list[_Row], images_dir: pathlib.Path) -> None:
  """Renders and writes all of one product's rows; sets doc titles."""
  rng = np.random.default_rng([spec.seed, product.index])
  noise_rng = np.random.default_rng([spec.seed, product.index, 1])
  sprite = synthetic_render.render_sprite(product, rng, resolution=max(128, 4 * spec.image_size))
  fraction = synthetic_products.SIZES[product.size][0]
  images: dict[int, Image.Image] = {}
  base = sorted((r for r in rows if r.source is None), key=lambda r: (r.kind, r.variant))
  duplicates = sorted((r for r in rows if r.source is not None), key=lambda r: r.id)
  for row in base + duplicates:
    if row.source is not None:
      image = synthetic_render.near_duplicate(images[id(row.source)], noise_rng)
      row.title = row.source.title
    elif row.kind == "doc":
      image = synthetic_render.render_doc(sprite, fraction, spec.image_size, rng)
      row.title = synthetic_products.compose_title(product, rng)
    else:
      image = synthetic_render.render_query(sprite, fraction, spec.image_size,
                                            spec.query_difficulty, rng)
    images[id(row)] = image
    data = _encode(image, row.ext)
    if "corrupt" in row.noise:
      data = _corrupt(data, noise_rng)
    (images_dir / f"{row.id}.{row.ext}").write_bytes(data)
  for row in rows:  # After rendering, so near-duplicates copy the real title.
    if "empty_title" in row.noise:
      row.title = ""


def _write_csvs(root: pathlib.Path, rows: list[_Row],
                products: list[synthetic_products.Product]) -> None:
  with open(root / "catalogue.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(CATALOGUE_COLUMNS)
    for r in rows:
      writer.writerow((r.id, f"images/{r.id}.{r.ext}", r.title, r.label, r.kind, r.split))
  with open(root / "ground_truth.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(GROUND_TRUTH_COLUMNS)
    for r in rows:
      product_id = products[r.product].product_id
      noise = ";".join(k for k in NOISE_KINDS if k in r.noise)
      writer.writerow((r.id, product_id, product_id, noise))


def _summary(spec: CatalogueSpec, rows: list[_Row]) -> dict[str, Any]:
  docs = collections.Counter(r.product for r in rows if r.kind == "doc" and r.source is None)
  sizes = sorted(docs.values())
  return {
      "generator_version": GENERATOR_VERSION,
      "spec": spec.to_json(),
      "num_products": spec.num_products,
      "num_products_by_split": {
          s: len({r.product for r in rows if r.split == s}) for s in ("train", "eval")},
      "num_rows": len(rows),
      "rows_by_kind_split": {
          f"{k}/{s}": sum(r.kind == k and r.split == s for r in rows)
          for k in ("doc", "query") for s in ("train", "eval")},
      "num_labels": len({r.label for r in rows}),
      "noise_counts": {k: sum(k in r.noise for r in rows) for k in NOISE_KINDS},
      "docs_per_product": {"min": sizes[0], "median": float(np.median(sizes)),
                           "max": sizes[-1]},
  }


def _existing_summary(root: pathlib.Path) -> dict[str, Any] | None:
  path = root / "catalogue.json"
  if not path.exists():
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def generate_catalogue(root: str | os.PathLike, spec: CatalogueSpec, *,
                       overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Writes the catalogue for `spec` under `root` and returns its summary.

  Reruns are cheap: if `root` already holds a catalogue of the same spec (and
  generator version) its summary is returned untouched, unless `overwrite`. Generation goes to a sibling
  temporary directory renamed into place at the end, so an interrupted run never
  leaves a partial catalogue that looks complete.

  Raises:
    ValueError: `root` holds a catalogue of another spec, or other files, and
      `overwrite` is False.
  """
  root = pathlib.Path(root)
  existing = _existing_summary(root)
  if existing is not None:
    same = (existing.get("spec") == spec.to_json()
            and existing.get("generator_version") == GENERATOR_VERSION)
    if same and not overwrite:
      return existing
    if not same and not overwrite:
      raise ValueError(
          f"{root} holds a synthetic catalogue of a different spec (or generator version "
          f"{existing.get('generator_version')} != {GENERATOR_VERSION}): "
          f"{existing.get('spec')} vs {spec.to_json()}; pass overwrite=True (--overwrite) "
          "or choose another root")
  elif root.exists() and any(root.iterdir()):
    # Never delete a directory we did not write.
    raise ValueError(f"{root} exists, is not empty and holds no catalogue.json; "
                     "choose an empty or new root")
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
  try:
    rng = np.random.default_rng(spec.seed)
    products = synthetic_products.sample_products(spec.num_products, rng)
    rows = _plan_rows(spec, products, rng)
    rows_of = collections.defaultdict(list)
    for row in rows:
      rows_of[row.product].append(row)
    (tmp / "images").mkdir()
    for product in tqdm.tqdm(products, desc="synthetic catalogue", unit="product",
                             disable=not progress):
      _render_product(spec, product, rows_of[product.index], tmp / "images")
    _write_csvs(tmp, rows, products)
    summary = _summary(spec, rows)
    with open(tmp / "catalogue.json", "w", encoding="utf-8") as f:  # Written last.
      json.dump(summary, f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a catalogue is shared data.
    if root.exists():
      shutil.rmtree(root)
    os.replace(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return summary


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--root", required=True, help="output directory")
  defaults = CatalogueSpec()
  for field in dataclasses.fields(CatalogueSpec):
    if field.name != "docs_per_product":
      parser.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)),
                          default=getattr(defaults, field.name))
  parser.add_argument("--overwrite", action="store_true")
  args = vars(parser.parse_args(argv))
  root, overwrite = args.pop("root"), args.pop("overwrite")
  summary = generate_catalogue(root, CatalogueSpec(**args), overwrite=overwrite)
  print(json.dumps({k: v for k, v in summary.items() if k != "spec"}, indent=2))


if __name__ == "__main__":
  main()
