"""`--mode=govern` with `config.governance.categories='product'`: catalogues in, product categories out.

  python -m oclear_jax.main --mode=govern --config=configs/fashion.py --workdir=W \
      --config.governance.categories=product --config.data.columns.colour=baseColour \
      --config.governance.extra_catalogues="('../shared/data/fashion_thumbs32k/meta.csv',)"

Steps, each logged per row in decisions.csv:
  1. read: data's catalogue and `extra_catalogues`, one column mapping (product_categories.read_catalogues);
  2. images: every file is read and fully decoded once (a per-item pass through the executor, Beam or in
     process); unreadable images are dropped, and exact duplicates (same file bytes, sha256) keep one row:
     an eligible (evaluable) one, then the most exposed, then the first;
  3. categories: same title / colour variants / single product (product_categories.product_categories);
  4. split: whole categories to train / val / eval (product_categories.group_split); rows of a held-out
     category that come from a source outside `eval_sources` (e.g. thumbnails) are dropped from training.

Not run here, on purpose: the feature-space steps of raw mode (merge, split, outliers, long tail, near
duplicates). They need EfficientNet-Lite0 features of every image (about 90 images/s on 2 CPU cores: 8+
minutes for 44k products) and a within-category spread to measure distances in, which categories that are
mostly single products (their own class, by design) do not give; and the long-tail step would drop exactly
the single products this mode keeps. Product categories come from titles, so they are decided on titles.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from input_pipeline import catalogue as catalogue_lib
from oclear_jax.governance import decisions as decisions_lib
from oclear_jax.governance import featurize
from oclear_jax.governance import long_tail
from oclear_jax.governance import product_categories as pc
from oclear_jax.governance import report
from oclear_jax.governance import report_plots
from oclear_jax.governance import settings as settings_lib

CURATED_COLUMNS = ("id", "image", "title", "label", "kind", "split", "coarse_label", "level", "title_group",
                   "variant_group", "source")
DECISION_COLUMNS = decisions_lib.DECISION_COLUMNS + ("level", "source")
CATEGORY_MAP_COLUMNS = ("category", "level", "split", "rows", "kept", "dropped_not_evaluable", "sources",
                        "coarse_labels", "titles", "reason")


def check_images_chunk(paths: Sequence[str]) -> list[tuple[str, str]]:
  """The per-item pass: (sha256 of the bytes or '', '' if the image decodes else why not) per path."""
  out = []
  for path in paths:
    image, data, error = featurize.read_image(path)
    out.append((hashlib.sha256(data).hexdigest() if data else "", "" if image is not None else error))
  return out


@dataclasses.dataclass
class ProductResult:
  decisions: list[decisions_lib.ItemDecision]  # one per input row, in order
  level: list[str]  # per input row ('' where dropped before the categories)
  categories: pc.ProductCategories  # over the rows that reached step 3 (`grouped`)
  grouped: list[int]  # input positions of those rows
  split: pc.GroupSplit
  counts: dict[str, Any]


def govern_products(rows: Sequence[catalogue_lib.CatalogueRow], source: Sequence[str], eligible: Sequence[bool],
                    settings: settings_lib.GovernanceSettings, executor, *, seed: int) -> ProductResult:
  """Steps 2-4 of the module docstring over already read rows."""
  n = len(rows)
  decisions = [decisions_lib.ItemDecision(r.id, r.kind, r.split, r.label) for r in rows]
  size = settings.chunk_size
  chunks = [[r.image_path for r in rows[i:i + size]] for i in range(0, n, size)]
  checked = [c for part in executor.map_chunks("check images", check_images_chunk, chunks,
                                               sizes=[len(c) for c in chunks]) for c in part]
  counts = collections.Counter()
  alive = []
  for i, (_, error) in enumerate(checked):
    if error:
      decisions[i].set(decisions_lib.DROPPED, "featurize", f"image unreadable ({error}): {rows[i].image_path}")
      counts["unreadable"] += 1
    else:
      alive.append(i)
  if settings.dedupe:
    by_hash = collections.defaultdict(list)
    for i in alive:
      by_hash[checked[i][0]].append(i)
    dropped = set()
    for members in by_hash.values():
      if len(members) < 2:
        continue
      keep = min(members, key=lambda i: (not eligible[i], -(rows[i].exposure or 0.0), i))
      for i in members:
        if i != keep:
          other = "" if pc.title_key(rows[i].title) == pc.title_key(rows[keep].title) else \
              f", titled {rows[keep].title!r}"
          decisions[i].set(decisions_lib.DROPPED, "duplicates", f"exact duplicate (same file bytes) of "
                           f"{rows[keep].id} from {source[keep]}{other}")
          dropped.add(i)
    counts["exact_duplicates"] = len(dropped)
    alive = [i for i in alive if i not in dropped]
  cats = pc.product_categories([rows[i].id for i in alive], [rows[i].title for i in alive],
                               [rows[i].label for i in alive], [rows[i].colour for i in alive],
                               min_tokens=settings.variant_min_tokens)
  split = pc.group_split(cats.category, [eligible[i] for i in alive], seed=seed,
                         val_fraction=settings.val_fraction, eval_fraction=settings.eval_fraction,
                         heldout_min_rows=settings.heldout_min_rows)
  capped = _cap_train_heads(cats.category, split.split, [rows[i] for i in alive], settings.max_category_size)
  counts["head_capped"] = len(capped)
  level = [""] * n
  for k, i in enumerate(alive):
    level[i] = cats.level[k]
    d = decisions[i]
    if k in capped:
      d.set(decisions_lib.DROPPED, "head_cap", f"category {cats.category[k]!r} keeps {settings.max_category_size} "
            "training rows (config.governance.max_category_size); the most exposed, then by id hash")
    elif split.split[k]:
      d.split = split.split[k]
      d.set(decisions_lib.KEPT, "product_categories", f"{cats.reason[k]}; {split.reason[k]}", category=cats.category[k])
    else:
      d.set(decisions_lib.DROPPED, "product_split", f"{split.reason[k]}; category {cats.category[k]!r}")
  for d in decisions:
    if d.action == decisions_lib.DROPPED:
      d.split = ""
  counts.update({"rows": n, **{f"categories_{k}": v for k, v in cats.counts.items()},
                 **{f"split_{k}": v for k, v in split.counts.items()}})
  kept_of = collections.Counter((cats.category[k], split.split[k]) for k in range(len(alive))
                                if split.split[k] and k not in capped)
  counts["eval_categories_with_2_or_more_rows"] = sum(1 for (c, s), v in kept_of.items() if s == "eval" and v > 1)
  counts["val_categories_with_2_or_more_rows"] = sum(1 for (c, s), v in kept_of.items() if s == "val" and v > 1)
  counts["steps"] = dict(collections.Counter(f"{d.step}/{d.action}" for d in decisions))
  return ProductResult(decisions=decisions, level=level, categories=cats, grouped=alive, split=split,
                       counts=dict(counts))


def _cap_train_heads(category: Sequence[str], split: Sequence[str], rows, cap: int) -> set[int]:
  """Positions of training rows beyond `cap` in their category (0 = no cap): one title repeated over
  hundreds of products ("Catwalk Women Black Heels") is a product line, not one product."""
  if not cap:
    return set()
  members = collections.defaultdict(list)
  for k, (c, s) in enumerate(zip(category, split)):
    if s == "train":
      members[c].append(k)
  out = set()
  for ks in members.values():
    if len(ks) > cap:
      order = long_tail.cap_order([rows[k].id for k in ks], np.array([rows[k].exposure or 0.0 for k in ks]))
      out.update(ks[j] for j in order[cap:])
  return out


def _write_csv(path: str, columns: Sequence[str], rows) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
  os.replace(tmp, path)  # A reader never sees half a catalogue.


def _category_map(result: ProductResult, rows, source) -> list[list]:
  cats, split = result.categories, result.split
  members = collections.defaultdict(list)
  for k, i in enumerate(result.grouped):
    members[cats.category[k]].append((k, i))
  out = []
  for name in sorted(members, key=lambda c: (-len(members[c]), c)):
    ks = members[name]
    k0 = ks[0][0]
    titles = sorted({" ".join(rows[i].title.split()) for _, i in ks})
    reason = cats.category_reason.get(name, "") or cats.reason[k0]
    kept = sum(1 for _, i in ks if result.decisions[i].action != decisions_lib.DROPPED)
    out.append([name, cats.level[k0], split.group_split[name], len(ks), kept,
                sum(1 for k, _ in ks if not split.split[k]), ";".join(sorted({source[i] for _, i in ks})),
                ";".join(sorted({rows[i].label for _, i in ks})), " | ".join(titles[:5]) +
                (f" | ... ({len(titles)} titles)" if len(titles) > 5 else ""), reason])
  return out


def write_outputs(out_dir: str, result: ProductResult, rows, source, settings) -> dict[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in (
      "curated_catalogue.csv", "decisions.csv", "category_map.csv", "class_weights.json", "summary.json")}
  cats = result.categories
  position = {i: k for k, i in enumerate(result.grouped)}
  curated, log = [], []
  for i, (row, d) in enumerate(zip(rows, result.decisions)):
    k = position.get(i)
    if d.action != decisions_lib.DROPPED:
      curated.append([row.id, row.image_path, row.title, d.category, row.kind, d.split, row.label, cats.level[k],
                      cats.title_group[k], cats.variant_group[k], source[i]])
    log.append([d.id, d.kind, d.split, d.raw_label, d.category, d.action, d.step, d.reason, "", "",
                result.level[i], source[i]])
  _write_csv(paths["curated_catalogue.csv"], CURATED_COLUMNS, curated)
  _write_csv(paths["decisions.csv"], DECISION_COLUMNS, log)
  _write_csv(paths["category_map.csv"], CATEGORY_MAP_COLUMNS, _category_map(result, rows, source))
  train_sizes = collections.Counter(r[3] for r in curated if r[5] == "train")
  with open(paths["class_weights.json"], "w", encoding="utf-8") as f:
    json.dump({"scheme": f"n ** -{settings.balance_power}, scaled so the largest weight is 1",
               "weights": long_tail.sampling_weights(dict(train_sizes), settings.balance_power)},
              f, indent=1, ensure_ascii=False)
  return paths


def write_report(out_dir: str, result: ProductResult, rows, source, reader_counts, settings) -> dict[str, str]:
  """report.md / report.html: counts per level and split, class sizes, drops, example groups."""
  c, cats = result.counts, result.categories
  sizes_before = collections.Counter(rows[i].label for i in result.grouped)
  sizes_after = collections.Counter(cats.category)
  report_plots.plot_class_sizes(sizes_before, sizes_after, os.path.join(out_dir, "class_sizes.png"))
  report_plots.plot_decisions(c["steps"], os.path.join(out_dir, "decisions.png"))
  by_category = collections.defaultdict(list)
  for k, i in enumerate(result.grouped):
    by_category[cats.category[k]].append(i)
  blocks = [("h", "Product categories"),
            ("p", f"{c['rows']} rows from {len(reader_counts)} catalogue(s) -> {c['categories_categories']} product "
                  f"categories (raw labels: {len(sizes_before)})."),
            ("h2", "Levels"),
            ("table", ("level", "categories", "rows", "why"), [
                (level, c[f"categories_{level}_categories"], c[f"categories_{level}_rows"], why) for level, why in (
                    ("colour_variants", "titles that agree once colour words are removed"),
                    ("same_title", "one normalised title, no colour variant"),
                    ("single_product", "a title no other product shares: its augmented views are its samples"))]),
            ("h2", "Split (whole categories)"),
            ("table", ("split", "categories", "rows"), [(s, c[f"split_{s}_groups"], c[f"split_{s}"])
                                                       for s in pc.SPLITS] +
             [("dropped from training", "", c["split_dropped"])]),
            ("ul", [f"held out only where a row comes from {list(settings.eval_sources) or 'the main catalogue'}; "
                    f"rows of other sources in a held-out category are dropped from training "
                    f"({c['split_dropped']})",
                    f"eval categories with 2 or more rows (queries with a positive): "
                    f"{c['eval_categories_with_2_or_more_rows']}",
                    f"unreadable images dropped: {c.get('unreadable', 0)}; exact duplicates dropped: "
                    f"{c.get('exact_duplicates', 0)}; training rows over the head cap dropped: {c['head_capped']}",
                    f"colour-stripped titles too generic to merge: {c['categories_generic_stripped_titles']}"]),
            ("h2", "Catalogues read"),
            ("table", ("source", "rows read", "rows kept"), [(s, v["rows_read"], v["rows_kept"])
                                                            for s, v in reader_counts.items()]),
            ("img", "class_sizes.png", "Class sizes: raw labels and product categories"),
            ("img", "decisions.png", "Decisions per step")]
  examples = sorted((name for name, level in zip(cats.category, cats.level) if level == "colour_variants"),
                    key=lambda name: -len(by_category[name]))
  picked = list(dict.fromkeys(examples))[:: max(1, len(set(examples)) // max(1, settings.report_examples))]
  sheet = [[(rows[i].image_path, rows[i].title) for i in by_category[name][:6]]
           for name in picked[:settings.report_examples]]
  if report_plots.thumbnail_sheet(sheet, os.path.join(out_dir, "examples_colour_variants.png"),
                                  "colour-variant categories (one row each)"):
    blocks.append(("img", "examples_colour_variants.png", "Colour-variant categories, one per row"))
  blocks.append(("p", "Files: curated_catalogue.csv (label = product category, coarse_label = raw label), "
                      "decisions.csv (one row per input row, with the reason), category_map.csv (one row per "
                      "category), class_weights.json, summary.json."))
  paths = {"markdown": os.path.join(out_dir, "report.md"), "html": os.path.join(out_dir, "report.html")}
  with open(paths["markdown"], "w", encoding="utf-8") as f:
    f.write(report._markdown(blocks))  # pylint: disable=protected-access  (one report format for both modes)
  with open(paths["html"], "w", encoding="utf-8") as f:
    f.write(report._html(blocks))  # pylint: disable=protected-access
  return paths


def eligible_rows(source: Sequence[str], names: Sequence[str], eval_sources: Sequence[str]) -> list[bool]:
  """Rows whose source may be held out; `eval_sources` () means the first (main) catalogue."""
  allowed = set(eval_sources) or {names[0]}
  unknown = sorted(allowed - set(names))
  if unknown:
    raise ValueError(f"config.governance.eval_sources names {unknown}, but the catalogues read are {list(names)} "
                     "(each named after its folder); use those names")
  return [s in allowed for s in source]


def run(main_csv: str, columns: catalogue_lib.CatalogueColumns, settings: settings_lib.GovernanceSettings,
        executor, out_dir: str, *, seed: int, max_rows: int | None = None) -> dict[str, Any]:
  """Reads the catalogues, governs them into product categories and writes every output; counts and paths."""
  catalogue = pc.read_catalogues([main_csv, *settings.extra_catalogues], columns, max_rows=max_rows, split_seed=seed)
  names = [name for name, _ in catalogue.sources]
  eligible = eligible_rows(catalogue.source, names, settings.eval_sources)
  result = govern_products(catalogue.rows, catalogue.source, eligible, settings, executor, seed=seed)
  result.counts["renamed_ids"] = catalogue.renamed_ids
  paths = write_outputs(out_dir, result, catalogue.rows, catalogue.source, settings)
  with open(paths["summary.json"], "w", encoding="utf-8") as f:
    json.dump({"mode": "product", "catalogues": dict(catalogue.sources), "reader": catalogue.counts,
               "counts": result.counts, "settings": dataclasses.asdict(settings)},
              f, indent=1, ensure_ascii=False, default=str)
  paths.update(write_report(out_dir, result, catalogue.rows, catalogue.source, catalogue.counts, settings))
  return {"counts": result.counts, "paths": paths, "result": result, "sources": catalogue.sources}
