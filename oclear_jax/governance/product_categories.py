"""Product-level categories from catalogue titles: same title, colour variants, single products.

OCLEAR learns by classification over fine-grained same-PRODUCT categories. A raw catalogue's label
(e.g. articleType) is far coarser; its titles are not: products that share a title are one product,
and titles that agree once their colour words are removed ("Nike Men Red Shirt", "Nike Men Navy Blue
Shirt") are the colour variants of one product. Every row gets exactly one category, a level and a
sentence saying why:

  colour_variants  rows whose titles differ only in colour words: one category
  same_title       rows sharing one normalised title (no colour variant of it)
  single_product   a title no other row shares: its own category, its augmented views are its samples

The colour lexicon is general English (basic and common fashion colours, multi-word ones such as
"navy blue" and "off white", light/dark modifiers, "&"/"and"/"/" between colours) plus the values of
the catalogue's own colour column when it has one; it is not fitted to any one retailer. Two guards
keep stripping from merging unrelated products: words before the first audience word ("men",
"women", ...) are taken as the brand and never stripped ("Red Tape Men Brown Shoes" keeps "red
tape"), and a stripped title that is left too generic (fewer than `min_tokens` content words, or
nothing but the brand and audience) does not merge: the row falls back to its exact title.

`group_split` assigns whole categories (so no same-title or colour-variant group is on two sides) to
train / val / eval by a stable hash of the category key, like input_pipeline/catalogue.py's
`label_in_eval`; only groups holding an eligible row (e.g. full-resolution photos) may be evaluated,
and the ineligible rows of an evaluated group are dropped from training with a logged reason.
`read_catalogues` reads several catalogue CSVs with one column mapping into one list of rows.
Pure Python and numpy: no JAX, no TensorFlow, no images.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Sequence

from input_pipeline import catalogue as catalogue_lib

LEVELS = ("colour_variants", "same_title", "single_product")
SPLITS = ("train", "val", "eval")

# General English colour words, not fitted to one catalogue: basic colours, common fashion shades and
# the multi-word names retailers use. Brand-like or material-like words that are rarely colours in a
# title ("skin", "ash", "denim", "platinum") are left out; a catalogue's own colour column adds them.
COLOUR_WORDS = (
    "black", "white", "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "grey", "gray",
    "violet", "indigo", "navy", "maroon", "beige", "cream", "ivory", "khaki", "olive", "teal", "turquoise",
    "aqua", "cyan", "magenta", "fuchsia", "lavender", "lilac", "mauve", "peach", "coral", "salmon", "mustard",
    "gold", "golden", "silver", "bronze", "copper", "tan", "camel", "charcoal", "burgundy", "wine", "plum",
    "rust", "taupe", "nude", "lime", "mint", "rose", "multi", "multicolour", "multicolor", "multicoloured",
    "multicolored", "metallic", "gunmetal", "steel", "mushroom", "coffee", "chocolate", "caramel", "ecru",
    "melange", "neon", "fluorescent", "emerald", "crimson", "scarlet", "amber", "cobalt", "azure", "ochre",
    "terracotta", "blush", "champagne", "mocha", "offwhite", "sand", "stone", "berry", "pewter", "jet",
    "off white", "navy blue", "sky blue", "royal blue", "baby blue", "powder blue", "ice blue", "steel blue",
    "teal blue", "turquoise blue", "sea green", "bottle green", "forest green", "lime green", "mint green",
    "olive green", "army green", "rose gold", "rose pink", "hot pink", "baby pink", "dusty pink",
    "coffee brown", "mushroom brown", "grey melange", "gray melange", "burnt orange", "wine red",
    "cherry red", "brick red", "jet black", "snow white", "pure white", "dark navy")
# A modifier is stripped only together with the colour it qualifies ("light blue"; "light weight" stays).
COLOUR_MODIFIERS = ("light", "dark", "pale", "bright", "deep", "dusty", "muted", "pastel", "soft", "mid", "medium",
                    "neon", "fluorescent", "metallic")
# Between two colours these belong to the colour phrase ("Blue & Grey", "Black/White", "Black n Gold").
COLOUR_CONNECTORS = ("and", "/", "n", "with", "on")
# After a colour these do too ("Red Coloured", "Two-Tone" is left alone).
COLOUR_SUFFIXES = ("colour", "color", "coloured", "colored", "tone", "toned", "shade", "shaded")
# Who a product is for: the words before the first of these are taken as the brand.
AUDIENCE_WORDS = ("men", "mens", "man", "women", "womens", "woman", "unisex", "boys", "boy", "girls", "girl",
                  "kids", "kid", "baby", "babies", "infant", "infants", "ladies", "lady", "gents", "toddler")
STOP_WORDS = ("a", "an", "the", "of", "for", "in", "by", "and", "with", "to", "on", "set", "pack", "s")  # s: "men's"
# Placeholder values of a colour column that are not colours.
_NOT_COLOURS = ("", "na", "n a", "none", "null", "unknown", "other", "others", "nan", "not applicable")

_MAX_BRAND_WORDS = 4
_TOKEN = re.compile(r"[^\W_]+|[&/+]")


def tokens(title: str) -> list[str]:
  """Case-folded word tokens; '&' and '+' read as 'and', '/' kept (a colour connector only)."""
  out = []
  for t in _TOKEN.findall((title or "").casefold()):
    out.append("and" if t in ("&", "+") else t)
  return out


def title_key(title: str) -> str:
  """The same-title key: case, whitespace and punctuation normalised ("Blue/Grey" == "blue grey")."""
  return " ".join(t for t in tokens(title) if t != "/")


@dataclasses.dataclass(frozen=True)
class ColourLexicon:
  """Colour phrases (token tuples) and the longest phrase length."""
  phrases: frozenset[tuple[str, ...]]
  modifiers: frozenset[str]
  max_len: int

  @staticmethod
  def build(extra_colours: Iterable[str] = ()) -> "ColourLexicon":
    """The general lexicon plus `extra_colours` (e.g. the values of the catalogue's colour column)."""
    phrases = set()
    for value in list(COLOUR_WORDS) + list(extra_colours):
      phrase = tuple(t for t in tokens(value) if t != "/")
      if not phrase or " ".join(phrase) in _NOT_COLOURS or any(t.isdigit() for t in phrase):
        continue
      phrases.add(phrase)
    return ColourLexicon(frozenset(phrases), frozenset(COLOUR_MODIFIERS), max(map(len, phrases), default=1))

  def match(self, toks: Sequence[str], i: int) -> int:
    """Length of the colour phrase starting at toks[i] (a modifier joins a colour after it); 0 if none."""
    for n in range(min(self.max_len, len(toks) - i), 0, -1):
      if tuple(toks[i:i + n]) in self.phrases:
        return n
    if toks[i] in self.modifiers and i + 1 < len(toks):
      rest = self.match(toks, i + 1)
      return 1 + rest if rest else 0
    return 0


@dataclasses.dataclass(frozen=True)
class StrippedTitle:
  key: str  # the title without its colour words ('' when nothing is left)
  colours: tuple[str, ...]  # the colour phrases removed
  generic: str  # why the stripped key may not merge ('' when it may)


def strip_colours(title: str, lexicon: ColourLexicon, *, min_tokens: int = 2) -> StrippedTitle:
  """Removes colour phrases (and connectors between them) outside the brand; says if what is left is generic."""
  toks = tokens(title)
  audience = next((i for i, t in enumerate(toks) if t in AUDIENCE_WORDS), None)
  # Words before an early audience word are the brand, never stripped ("Red Tape Men ..."); a late one
  # ("... Shoes for Men") marks no brand.
  brand_end = audience if audience is not None and audience <= _MAX_BRAND_WORDS else 0
  colour = [False] * len(toks)
  i = brand_end
  while i < len(toks):
    n = lexicon.match(toks, i)
    if n:
      colour[i:i + n] = [True] * n
      i += n
    else:
      i += 1
  # Connectors between two colour phrases and suffixes after one belong to the colour phrase.
  for i in range(brand_end, len(toks)):
    if colour[i]:
      continue
    if toks[i] in COLOUR_CONNECTORS and 0 < i < len(toks) - 1 and colour[i - 1] and colour[i + 1]:
      colour[i] = True
    elif toks[i] in COLOUR_SUFFIXES and i > 0 and colour[i - 1]:
      colour[i] = True
  colours, run = [], []
  for t, c in zip(toks, colour):
    if c:
      run.append(t)
    elif run:
      colours.append(" ".join(run))
      run = []
  if run:
    colours.append(" ".join(run))
  key = " ".join(t for t, c in zip(toks, colour) if not c and t != "/")
  # Content words: the brand's (whatever they are: "AND" is a brand) and the rest's that are neither
  # audience nor stop words.
  brand = [t for t in toks[:brand_end] if t != "/"]
  beyond_brand = len([t for t, c in zip(toks[brand_end:], colour[brand_end:])
                      if not c and t != "/" and t not in AUDIENCE_WORDS and t not in STOP_WORDS])
  content = len(brand) + beyond_brand
  generic = ""
  if not key:
    generic = "nothing is left without the colour words"
  elif content < min_tokens:
    generic = f"only {content} content word(s) left ({key!r}; a variant group needs {min_tokens})"
  elif brand and beyond_brand < 1:
    generic = f"only the brand and audience are left ({key!r})"
  return StrippedTitle(key=key, colours=tuple(colours), generic=generic)


@dataclasses.dataclass
class ProductCategories:
  """Per row (input order): the product category and why; per category: its key and level."""
  category: list[str]  # 'v:<colour-stripped title>' | 't:<normalised title>' | 'p:<id>' (empty title)
  level: list[str]  # one of LEVELS
  reason: list[str]
  coarse_label: list[str]  # the raw label, for an auxiliary head
  title_group: list[str]  # the normalised (same-title) key; '' for an empty title
  variant_group: list[str]  # the colour-stripped key the row merged under; '' where it did not merge
  counts: dict[str, int]
  category_reason: dict[str, str] = dataclasses.field(default_factory=dict)  # per group: why (no row details)


def _quote_titles(titles: Sequence[str], limit: int = 3) -> str:
  shown = ", ".join(repr(t) for t in titles[:limit])
  return shown + (f" and {len(titles) - limit} more" if len(titles) > limit else "")


def product_categories(ids: Sequence[str], titles: Sequence[str], coarse_labels: Sequence[str],
                       colours: Sequence[str] | None = None, *, extra_colour_words: Iterable[str] = (),
                       min_tokens: int = 2) -> ProductCategories:
  """Groups rows into product categories (see the module docstring).

  Args:
    ids: unique row ids (name single products whose title is empty).
    titles: product titles.
    coarse_labels: the raw labels (articleType), passed through for an auxiliary head.
    colours: the catalogue's colour column, or None; its values join the colour lexicon.
    extra_colour_words: more colour phrases for the lexicon.
    min_tokens: content words a colour-stripped title must keep to merge colour variants.
  """
  n = len(ids)
  if not len(titles) == len(coarse_labels) == n or (colours is not None and len(colours) != n):
    raise ValueError("ids, titles, coarse_labels (and colours) must have one entry per row")
  lexicon = ColourLexicon.build(list(extra_colour_words) + sorted(set(colours or ())))
  exact = [title_key(t) for t in titles]
  stripped: dict[str, StrippedTitle] = {}
  original_title: dict[str, str] = {}
  for key, title in zip(exact, titles):
    if key and key not in stripped:
      stripped[key] = strip_colours(title, lexicon, min_tokens=min_tokens)
      original_title[key] = " ".join(title.split())
  rows_of_title = collections.Counter(k for k in exact if k)
  # Colour-variant groups: distinct exact titles that share a mergeable stripped key.
  titles_of_variant = collections.defaultdict(list)
  for key, s in stripped.items():
    if not s.generic:
      titles_of_variant[s.key].append(key)
  category, level, reason, variant = [], [], [], []
  category_reason = {}
  for i in range(n):
    key = exact[i]
    if not key:
      category.append(f"p:{ids[i]}")
      level.append("single_product")
      reason.append("single product: empty title, so nothing can be grouped with it; its augmented views "
                    "are its samples")
      variant.append("")
      continue
    s = stripped[key]
    members = titles_of_variant.get(s.key, []) if not s.generic else []
    if len(members) > 1:
      size = sum(rows_of_title[m] for m in members)
      category.append(f"v:{s.key}")
      level.append("colour_variants")
      variant.append(s.key)
      why = (f"colour variants: {size} products under {len(members)} titles that agree without their colour "
             f"words, as {s.key!r}: {_quote_titles(sorted(original_title[m] for m in members))}")
      category_reason[category[-1]] = why
      reason.append(why + (f"; this row's colour words: {', '.join(s.colours)}" if s.colours else ""))
      continue
    variant.append("")
    category.append(f"t:{key}")
    why_not = f"; the colour-stripped title does not merge: {s.generic}" if s.generic and s.colours else ""
    if rows_of_title[key] > 1:
      level.append("same_title")
      reason.append(f"same title: {rows_of_title[key]} products titled {original_title[key]!r}{why_not}")
      category_reason[category[-1]] = reason[-1]
    else:
      level.append("single_product")
      reason.append(f"single product: no other product shares its title{why_not}; its augmented views are "
                    "its samples")
  sizes = collections.Counter(category)
  counts = {"rows": n, "categories": len(sizes)}
  for name in LEVELS:
    cats = {c for c, l in zip(category, level) if l == name}
    counts[f"{name}_categories"] = len(cats)
    counts[f"{name}_rows"] = sum(sizes[c] for c in cats)
  counts["same_title_groups_of_2_or_more"] = sum(1 for v in rows_of_title.values() if v > 1)
  counts["rows_in_same_title_groups"] = sum(v for v in rows_of_title.values() if v > 1)
  counts["generic_stripped_titles"] = sum(1 for s in stripped.values() if s.generic and s.colours)
  counts["largest_category"] = max(sizes.values(), default=0)
  return ProductCategories(category=category, level=level, reason=reason, coarse_label=list(coarse_labels),
                           title_group=exact, variant_group=variant, counts=counts, category_reason=category_reason)


def stable_unit(key: str, seed: int) -> float:
  """A number in [0, 1) from (seed, key) by sha256, the same on every machine and run
  (input_pipeline.catalogue.label_in_eval(key, f, seed) is `stable_unit(key, seed) < f`)."""
  digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclasses.dataclass
class GroupSplit:
  split: list[str]  # per row: 'train' | 'val' | 'eval' | '' (dropped: ineligible row of a val/eval group)
  reason: list[str]  # per row
  group_split: dict[str, str]  # per group key
  counts: dict[str, int]


def group_split(groups: Sequence[str], eligible: Sequence[bool], *, seed: int, val_fraction: float,
                eval_fraction: float, heldout_min_rows: int = 1) -> GroupSplit:
  """Whole groups to train / val / eval.

  A group is held out only if it has `heldout_min_rows` eligible rows (2: every held-out row has a
  positive to find); of those groups, about `eval_fraction` go to
  eval and `val_fraction` to val, by `stable_unit(group, seed)`, so the answer for a group never
  depends on the other rows. An ineligible row of a held-out group goes nowhere: it is dropped from
  training (training on it would put its product on both sides) and the reason says so.
  """
  if not (0 <= val_fraction and 0 <= eval_fraction and val_fraction + eval_fraction <= 1):
    raise ValueError(f"val_fraction={val_fraction} and eval_fraction={eval_fraction} must be >= 0 and sum to <= 1")
  if len(groups) != len(eligible):
    raise ValueError("groups and eligible must have one entry per row")
  eligible_rows = collections.Counter()
  for g, e in zip(groups, eligible):
    eligible_rows[g] += bool(e)
  has_eligible = {g: v >= max(1, heldout_min_rows) for g, v in eligible_rows.items()}
  assigned = {}
  for g, ok in has_eligible.items():
    u = stable_unit(g, seed) if ok else 1.0
    assigned[g] = "eval" if u < eval_fraction else "val" if u < eval_fraction + val_fraction else "train"
  split, reason = [], []
  counts = collections.Counter({s: 0 for s in SPLITS})
  counts["dropped"] = 0
  for g, e in zip(groups, eligible):
    s = assigned[g]
    if s == "train" or e:
      split.append(s)
      reason.append(f"split {s}: the whole group goes to {s}" if s != "train" or has_eligible[g] else
                    "split train: the group has too few rows that may be evaluated")
      counts[s] += 1
    else:
      split.append("")
      reason.append(f"dropped from training: its group is held out for {s} on its eligible rows, and this row "
                    f"may not be evaluated (not an eligible source, e.g. thumbnail resolution); training on it "
                    f"would put one product on both sides")
      counts["dropped"] += 1
  for s in SPLITS:
    counts[f"{s}_groups"] = sum(1 for v in assigned.values() if v == s)
  counts["eligible_groups"] = sum(has_eligible.values())
  return GroupSplit(split=split, reason=reason, group_split=assigned, counts=dict(counts))


@dataclasses.dataclass
class SourcedCatalogue:
  """Rows of several catalogues read with one column mapping; ids unique, image paths absolute."""
  rows: list[catalogue_lib.CatalogueRow]
  source: list[str]  # per row: the name of its catalogue
  sources: list[tuple[str, str]]  # (name, csv path) in reading order
  counts: dict[str, dict[str, int]]  # reader counts per source
  renamed_ids: int  # ids prefixed with their source name because an earlier source used them


def source_name(csv_path: str, taken: Iterable[str] = ()) -> str:
  """The catalogue's folder name (e.g. 'fashion_thumbs32k'), made unique against `taken`."""
  path = os.path.abspath(csv_path)
  base = os.path.basename(os.path.dirname(path)) or os.path.splitext(os.path.basename(path))[0]
  taken = set(taken)
  name, k = base, 2
  while name in taken:
    name, k = f"{base}_{k}", k + 1
  return name


def read_catalogues(csv_paths: Sequence[str], columns: catalogue_lib.CatalogueColumns, *,
                    max_rows: int | None = None, split_seed: int = 0) -> SourcedCatalogue:
  """Reads each CSV (image paths relative to its own folder) with the same `columns`.

  An id that an earlier catalogue already used becomes '<source>:<id>' (counted), so ids stay unique.
  The reader's own split (a split column, or its label hash) is kept on the rows; product mode
  replaces it with `group_split`.
  """
  rows, source, sources, counts, renamed = [], [], [], {}, 0
  seen: set[str] = set()
  for csv_path in csv_paths:
    name = source_name(csv_path, [s for s, _ in sources])
    read = catalogue_lib.read_catalogue(csv_path, columns, split_seed=split_seed, max_rows=max_rows)
    sources.append((name, os.path.abspath(csv_path)))
    counts[name] = read.counts
    for row in read.rows:
      if row.id in seen:
        new_id = f"{name}:{row.id}"
        if new_id in seen:
          raise ValueError(f"catalogue {csv_path}: id {row.id!r} is taken and so is {new_id!r}; rename the row")
        row = dataclasses.replace(row, id=new_id)
        renamed += 1
      seen.add(row.id)
      rows.append(row)
      source.append(name)
  return SourcedCatalogue(rows=rows, source=source, sources=sources, counts=counts, renamed_ids=renamed)
