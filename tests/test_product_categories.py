"""Product-level categories (governance/product_categories.py) and `--mode=govern` in product mode.

Planted ground truth: same titles, colour variants, generic titles that must not merge, single
products, a retailer-specific colour known only from the colour column; a group split with
ineligible (thumbnail) rows; a tiny two-catalogue govern run with a duplicate and a broken image.
"""
import collections
import csv
import pathlib
import random
import shutil

from PIL import Image
import pytest

from input_pipeline import catalogue as catalogue_lib
from oclear_jax import config_schema
from oclear_jax.commands import govern
from oclear_jax.governance import product_categories as pc
from oclear_jax.governance import settings as settings_lib

TABLE = [  # id, title, coarse label, colour column
    ("n1", "Nike Men Red Shirt", "Shirts", "Red"),
    ("n2", "Nike Men Navy Blue Shirt", "Shirts", "Navy Blue"),
    ("n3", "nike  men red shirt!", "Shirts", "Red"),
    ("w1", "Wildcraft Unisex Red Backpack", "Backpacks", "Red"),
    ("w2", "Wildcraft Unisex Blue & Grey Backpack", "Backpacks", "Blue"),
    ("p1", "Puma Unisex Backpack", "Backpacks", "Black"),
    ("p2", "PUMA Unisex Backpack", "Backpacks", "Black"),
    ("g1", "Red Shirt", "Shirts", "Red"),
    ("g2", "Blue Shirt", "Shirts", "Blue"),
    ("b1", "Nike Men Red", "Shirts", "Red"),
    ("b2", "Nike Men Blue", "Shirts", "Blue"),
    ("r1", "Red Tape Men Brown Shoes", "Shoes", "Brown"),
    ("r2", "Red Tape Men Black Shoes", "Shoes", "Black"),
    ("z1", "Acme Men Zorbla Jacket", "Jackets", "Zorbla"),
    ("z2", "Acme Men Black Jacket", "Jackets", "Black"),
    ("s1", "Levis Women Jeans", "Jeans", "Blue"),
    ("e1", "", "Jeans", "Blue"),
]


def _categories(colours=True):
  ids, titles, labels, col = zip(*TABLE)
  res = pc.product_categories(ids, titles, labels, col if colours else None)
  return {i: (c, l, r) for i, c, l, r in zip(ids, res.category, res.level, res.reason)}, res


def test_same_title_colour_variants_generic_and_single_products():
  by_id, res = _categories()
  assert len(res.category) == len(TABLE) and all(res.reason) and res.coarse_label == [t[2] for t in TABLE]
  # Colour variants (and a case/punctuation copy of one title) form one category.
  assert by_id["n1"][0] == by_id["n2"][0] == by_id["n3"][0] == "v:nike men shirt"
  assert by_id["n1"][1] == "colour_variants" and "colour variants: 3 products under 2 titles" in by_id["n1"][2]
  assert by_id["w1"][0] == by_id["w2"][0] == "v:wildcraft unisex backpack"  # "Blue & Grey" is one colour phrase
  assert by_id["p1"][:2] == by_id["p2"][:2] == ("t:puma unisex backpack", "same_title")
  # A colour and a generic word, or only brand and audience, never merge.
  for a, b in (("g1", "g2"), ("b1", "b2")):
    assert by_id[a][0] != by_id[b][0]
    assert by_id[a][1] == "single_product" and "does not merge" in by_id[a][2]
  # The brand is not stripped: "Red Tape" stays.
  assert by_id["r1"][0] == by_id["r2"][0] == "v:red tape men shoes"
  # The retailer's own colour word comes from its colour column.
  assert by_id["z1"][0] == by_id["z2"][0] == "v:acme men jacket"
  assert by_id["s1"][1] == "single_product" and "augmented views are its samples" in by_id["s1"][2]
  assert by_id["e1"] == ("p:e1", "single_product", by_id["e1"][2]) and "empty title" in by_id["e1"][2]
  assert res.title_group[0] == res.title_group[2] == "nike men red shirt"
  assert res.counts["colour_variants_categories"] == 4 and res.counts["same_title_categories"] == 1


def test_colour_column_values_extend_the_lexicon():
  by_id, _ = _categories(colours=False)
  assert by_id["z1"][0] != by_id["z2"][0]  # "Zorbla" is no English colour
  assert by_id["n1"][0] == by_id["n2"][0]  # the general lexicon alone knows "navy blue"


@pytest.mark.parametrize("title,key,generic", [
    ("Nike Women Light Blue Running Shoes", "nike women running shoes", False),
    ("Nike Women Light Weight Running Shoes", "nike women light weight running shoes", False),
    ("Fabindia Cream-Coloured & Blue Hand Printed Saree", "fabindia hand printed saree", False),
    ("Adidas Black/White Sports Shoes", "adidas sports shoes", False),
    ("Puma Black Sports Shoes for Men", "puma sports shoes for men", False),
    ("Off White Tee", "tee", True),
    ("Black", "", True),
])
def test_strip_colours(title, key, generic):
  s = pc.strip_colours(title, pc.ColourLexicon.build())
  assert (s.key, bool(s.generic)) == (key, generic)


def _planted_groups(seed=0, num_groups=3000):
  rng = random.Random(seed)
  groups, eligible = [], []
  for g in range(num_groups):
    for _ in range(rng.choice([1, 1, 2, 3, 5])):
      groups.append(f"group {g}")
      eligible.append(rng.random() < 0.4)
  return groups, eligible


def test_group_split_keeps_groups_whole_and_logs_drops():
  groups, eligible = _planted_groups()
  out = pc.group_split(groups, eligible, seed=3, val_fraction=0.1, eval_fraction=0.2)
  sides = collections.defaultdict(set)
  for g, e, s, r in zip(groups, eligible, out.split, out.reason):
    sides[g].add(s or out.group_split[g])
    if s in ("val", "eval"):
      assert e  # only eligible rows are held out
    if not s:
      assert not e and out.group_split[g] in ("val", "eval") and r.startswith("dropped from training")
  assert all(len(v) == 1 for v in sides.values())  # no group on two sides
  assert out.counts["dropped"] == sum(1 for s in out.split if not s) > 0
  held = out.counts["eligible_groups"]
  assert abs(out.counts["eval_groups"] / held - 0.2) < 0.03 and abs(out.counts["val_groups"] / held - 0.1) < 0.03
  again = pc.group_split(groups, eligible, seed=3, val_fraction=0.1, eval_fraction=0.2)
  assert again.split == out.split and again.reason == out.reason
  other = pc.group_split(groups, eligible, seed=4, val_fraction=0.1, eval_fraction=0.2)
  assert other.split != out.split
  # Stable: a group's side depends on its key alone, not on the other rows.
  half = pc.group_split(groups[: len(groups) // 2], eligible[: len(groups) // 2], seed=3, val_fraction=0.1,
                        eval_fraction=0.2)
  assert all(out.group_split[g] == s for g, s in half.group_split.items())
  assert catalogue_lib.label_in_eval("group 7", 0.2, 3) == (pc.stable_unit("group 7", 3) < 0.2)


def _write_catalogue(root: pathlib.Path, rows) -> pathlib.Path:
  (root / "images").mkdir(parents=True, exist_ok=True)
  with open(root / "meta.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["id", "productDisplayName", "articleType", "baseColour", "image"])
    for row_id, title, label, colour, rgb, size in rows:
      path = root / "images" / f"{row_id}.png"
      if rgb is not None:
        Image.new("RGB", size, rgb).save(path)
      writer.writerow([row_id, title, label, colour, f"images/{row_id}.png"])
  return root / "meta.csv"


def test_read_catalogues_makes_ids_unique(tmp_path):
  a = _write_catalogue(tmp_path / "shop_a", [("1", "X Men Red Shirt", "Shirts", "Red", (1, 2, 3), (8, 8))])
  b = _write_catalogue(tmp_path / "shop_b", [("1", "X Men Blue Shirt", "Shirts", "Blue", (4, 5, 6), (8, 8)),
                                             ("2", "Y Tee", "Tees", "Red", (7, 8, 9), (8, 8))])
  columns = catalogue_lib.CatalogueColumns(title="productDisplayName", label="articleType", colour="baseColour")
  cat = pc.read_catalogues([str(a), str(b)], columns)
  assert [r.id for r in cat.rows] == ["1", "shop_b:1", "2"] and cat.renamed_ids == 1
  assert cat.source == ["shop_a", "shop_b", "shop_b"] and [r.colour for r in cat.rows] == ["Red", "Blue", "Red"]
  assert all(pathlib.Path(r.image_path).is_absolute() and pathlib.Path(r.image_path).exists() for r in cat.rows)


BRANDS = ("Acme", "Borho", "Cirro", "Dunlo", "Egret", "Fjord", "Gavel", "Hollo", "Istra", "Jumbo")
COLOURS = (("Red", (200, 30, 30)), ("Navy Blue", (20, 20, 90)), ("Green", (30, 160, 40)))


def test_govern_product_mode_end_to_end(tmp_path):
  full, thumbs = [], []
  for b, brand in enumerate(BRANDS):
    for c, (colour, rgb) in enumerate(COLOURS[: 1 + b % 3]):
      shade = (rgb[0], rgb[1], (rgb[2] + 10 * b) % 256)
      full.append((f"{b}{c}", f"{brand} Men {colour} Shirt", "Shirts", colour, shade, (24, 32)))
    thumbs.append((f"t{b}", f"{brand} Men Green Shirt", "Shirts", "Green", (b, 250 - b, 9), (6, 8)))
    thumbs.append((f"{b}0", f"{brand} Women Tote", "Bags", "Black", (b, 9, 250 - b), (6, 8)))  # id collides
  full.append(("dup", "Acme Men Red Shirt", "Shirts", "Red", None, None))
  full.append(("broken", "Kilo Men Grey Tee", "Tshirts", "Grey", None, None))
  main_csv = _write_catalogue(tmp_path / "shop_full", full)
  shutil.copy(tmp_path / "shop_full" / "images" / "00.png", tmp_path / "shop_full" / "images" / "dup.png")
  (tmp_path / "shop_full" / "images" / "broken.png").write_bytes(b"not an image")
  extra_csv = _write_catalogue(tmp_path / "shop_thumbs", thumbs)

  config = config_schema.base_config()
  config.data.source = "csv"
  config.data.root = str(tmp_path / "shop_full")
  config.data.csv = "meta.csv"
  config.data.columns.update(dict(title="productDisplayName", label="articleType", kind="", split="",
                                  colour="baseColour"))
  config.governance.categories = "product"
  config.governance.extra_catalogues = (str(extra_csv),)
  config.governance.executor = "in_process"
  config.governance.val_fraction, config.governance.eval_fraction = 0.25, 0.5
  config.governance.max_category_size = 3  # head cap on training rows
  out = govern.run(config, str(tmp_path / "work"), progress=False, write_records=False)

  gov = tmp_path / "work" / "governance"
  with open(gov / "decisions.csv", newline="", encoding="utf-8") as f:
    decisions = list(csv.DictReader(f))
  with open(gov / "curated_catalogue.csv", newline="", encoding="utf-8") as f:
    curated = list(csv.DictReader(f))
  assert len(decisions) == len(full) + len(thumbs)
  assert len({d["id"] for d in decisions}) == len(decisions) and "shop_thumbs:00" in {d["id"] for d in decisions}
  assert all(d["reason"] for d in decisions)
  by_id = {d["id"]: d for d in decisions}
  assert (by_id["dup"]["action"], by_id["dup"]["step"]) == ("dropped", "duplicates")
  assert (by_id["broken"]["action"], by_id["broken"]["step"]) == ("dropped", "featurize")
  assert set(curated[0]) >= {"id", "image", "title", "label", "kind", "split", "coarse_label", "title_group",
                             "variant_group", "source", "level"}
  assert len(curated) == sum(d["action"] != "dropped" for d in decisions)
  assert all(pathlib.Path(r["image"]).is_absolute() for r in curated)
  sides = collections.defaultdict(set)
  for r in curated:
    sides[r["label"]].add(r["split"])
    if r["split"] in ("val", "eval"):
      assert r["source"] == "shop_full"
  assert all(len(v) == 1 for v in sides.values())
  assert by_id["00"]["category"] == "v:acme men shirt" and by_id["00"]["level"] == "colour_variants"
  split_drops = [d for d in decisions if d["step"] == "product_split"]
  assert split_drops and all(by_id[d["id"]]["source"] == "shop_thumbs" for d in split_drops)
  assert out["counts"]["split_dropped"] == len(split_drops)
  capped = [d for d in decisions if d["step"] == "head_cap"]
  assert capped and len(capped) == out["counts"]["head_capped"]
  assert max(collections.Counter(r["label"] for r in curated if r["split"] == "train").values()) <= 3
  # The trainer's CSV reader takes the curated catalogue as it is, 'val' included.
  read = catalogue_lib.read_catalogue(gov / "curated_catalogue.csv",
                                      catalogue_lib.CatalogueColumns(kind="kind", split="split"))
  assert read.counts["rows_kept"] == len(curated) and read.counts["val"] + read.counts["eval"] > 0
  with open(gov / "category_map.csv", newline="", encoding="utf-8") as f:
    assert {r["category"] for r in csv.DictReader(f)} == {d["category"] for d in decisions if d["category"]} | \
        {r["label"] for r in curated}
  assert (gov / "report.md").exists() and (gov / "class_weights.json").exists()


def test_raw_mode_is_the_default():
  config = config_schema.base_config()
  settings = settings_lib.from_config(config.governance)
  assert settings.categories == "raw" and settings.extra_catalogues == () and config.data.columns.colour == ""
  config.governance.categories = "products"
  with pytest.raises(ValueError, match="categories"):
    settings_lib.from_config(config.governance)


def test_real_catalogue_titles(fashion_dir):
  """Both Myntra folders, titles only (no images): the group counts the data README states, loosely."""
  thumbs = fashion_dir.parent / "fashion_thumbs32k" / "meta.csv"
  if not thumbs.exists():
    pytest.skip(f"{thumbs} not found")
  columns = catalogue_lib.CatalogueColumns(title="productDisplayName", label="articleType", colour="baseColour")
  cat = pc.read_catalogues([str(fashion_dir / "meta.csv"), str(thumbs)], columns)
  assert len(cat.rows) == 44110 and cat.renamed_ids == 0
  res = pc.product_categories([r.id for r in cat.rows], [r.title for r in cat.rows], [r.label for r in cat.rows],
                              [r.colour for r in cat.rows])
  print(res.counts)
  # README: 5,091 exact titles shared by 2+ products; normalising case and punctuation joins a few more.
  assert 4900 <= res.counts["same_title_groups_of_2_or_more"] <= 5400
  assert res.counts["colour_variants_categories"] > 4000 and res.counts["categories"] < 0.5 * len(cat.rows)
  small = [i for i, s in enumerate(cat.source) if s == "fashion_small12k"]
  alone = pc.product_categories([cat.rows[i].id for i in small], [cat.rows[i].title for i in small],
                                [cat.rows[i].label for i in small], [cat.rows[i].colour for i in small])
  groups = alone.counts["colour_variants_categories"] + alone.counts["same_title_categories"]
  assert 1600 <= groups <= 2000  # README: 1,798 colour-stripped groups of two or more within fashion_small12k
  eligible = [s == "fashion_small12k" for s in cat.source]
  split = pc.group_split(res.category, eligible, seed=0, val_fraction=0.1, eval_fraction=0.2)
  print(split.counts)
  assert split.counts["eval"] > 1000 and split.counts["dropped"] < 0.2 * len(thumbs.read_text().splitlines())


def test_held_out_groups_can_require_two_evaluable_rows():
  groups, eligible = _planted_groups(seed=1)
  out = pc.group_split(groups, eligible, seed=0, val_fraction=0.1, eval_fraction=0.2, heldout_min_rows=2)
  evaluable = collections.Counter(g for g, e in zip(groups, eligible) if e)
  for g, s in out.group_split.items():
    if s != "train":
      assert evaluable[g] >= 2
  assert out.counts["eval_groups"] > 0
