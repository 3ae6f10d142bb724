"""Product attributes and noisy titles for the synthetic catalogue.

A synthetic product is a combination of visual attributes (shape, colours, pattern,
size), a printed code ("A7"), a brand and a noun. The image renderer
(`synthetic_render`) draws the visual attributes and the code; titles describe the same
attributes the way real listings do: with synonyms, dropped words, shuffled adjectives
and the brand at either end. That gives the title tower signal that overlaps with,
but is not identical to, what the image shows.
"""

import dataclasses
import itertools

import numpy as np

# name -> (RGB, title synonyms). The first synonym is the plain name.
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((210, 30, 40), ("red", "crimson", "scarlet")),
    "orange": ((245, 130, 20), ("orange", "tangerine")),
    "yellow": ((245, 205, 30), ("yellow", "lemon", "golden")),
    "lime": ((150, 210, 40), ("lime", "chartreuse")),
    "green": ((30, 140, 60), ("green", "emerald", "forest green")),
    "teal": ((20, 150, 150), ("teal", "turquoise")),
    "sky": ((90, 180, 240), ("sky blue", "light blue", "baby blue")),
    "blue": ((30, 70, 200), ("blue", "cobalt", "royal blue")),
    "navy": ((20, 30, 90), ("navy", "dark blue", "midnight")),
    "purple": ((120, 40, 170), ("purple", "violet")),
    "pink": ((240, 110, 170), ("pink", "rose")),
    "brown": ((120, 70, 30), ("brown", "chocolate", "tan")),
    "grey": ((130, 130, 135), ("grey", "gray", "slate")),
    "black": ((25, 25, 25), ("black", "jet black", "onyx")),
}
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "round", "circular", "disc"),
    "square": ("square", "squared"),
    "triangle": ("triangle", "triangular"),
    "star": ("star", "star-shaped"),
    "hexagon": ("hexagon", "hexagonal", "hex"),
    "heart": ("heart", "heart-shaped"),
    "ring": ("ring", "hoop", "donut"),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus"),
    "pentagon": ("pentagon", "pentagonal"),
}
PATTERNS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain", ""),
    "stripes": ("striped", "stripy", "pinstripe"),
    "dots": ("polka-dot", "dotted", "spotted"),
    "checks": ("checked", "plaid", "gingham"),
    "gradient": ("gradient", "ombre", "faded"),
    "zigzag": ("zigzag", "chevron"),
}
# name -> (fraction of the frame the product fills, title synonyms).
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {
    "small": (0.5, ("small", "mini", "compact")),
    "medium": (0.68, ("medium", "regular", "mid-size")),
    "large": (0.86, ("large", "big", "XL")),
}
BRANDS = ("Acme", "Zenith", "Nova", "Orbit", "Kite", "Lumen", "Pico", "Vertex",
          "Apex", "Mosaic", "Quill", "Tandem", "Bolt", "Fjord")
NOUNS: dict[str, tuple[str, ...]] = {
    "badge": ("badge", "emblem"),
    "sticker": ("sticker", "decal"),
    "patch": ("patch", "iron-on patch"),
    "pin": ("pin", "lapel pin"),
    "magnet": ("magnet", "fridge magnet"),
    "coaster": ("coaster", "drink coaster"),
}
CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # No I/O/Q: they read as digits.


@dataclasses.dataclass(frozen=True)
class Product:
  """One product's identity; two products never share all fields."""
  index: int
  shape: str
  colour: str
  accent: str  # Second colour of the pattern (stripes, dots, ...).
  pattern: str
  size: str
  brand: str
  code: str  # Printed on the product, e.g. "A7".
  noun: str

  @property
  def product_id(self) -> str:
    return f"p{self.index:04d}"


def sample_products(num_products: int, rng: np.random.Generator) -> list[Product]:
  """Draws `num_products` distinct products.

  Visual combinations (shape, colour, pattern, size) are drawn without replacement
  while there are enough of them, so that products usually differ in appearance and
  not only in their printed code; beyond that, brand and code keep them distinct.
  """
  visual = list(itertools.product(SHAPES, COLOURS, PATTERNS, SIZES))
  order = rng.permutation(len(visual))
  colours = list(COLOURS)
  products: list[Product] = []
  seen: set[tuple[str, ...]] = set()
  while len(products) < num_products:
    shape, colour, pattern, size = visual[order[len(products) % len(visual)]]
    accent = colour
    while accent == colour:
      accent = colours[rng.integers(len(colours))] if rng.random() < 0.6 else "white"
    code = f"{CODE_LETTERS[rng.integers(len(CODE_LETTERS))]}{rng.integers(1, 100)}"
    product = Product(
        index=len(products), shape=shape, colour=colour, accent=accent, pattern=pattern,
        size=size, brand=BRANDS[rng.integers(len(BRANDS))], code=code,
        noun=list(NOUNS)[rng.integers(len(NOUNS))])
    key = dataclasses.astuple(product)[1:]
    if key not in seen:  # A collision just redraws brand and code.
      seen.add(key)
      products.append(product)
  return products


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
  return options[rng.integers(len(options))]


def compose_title(product: Product, rng: np.random.Generator) -> str:
  """A listing title for one catalogue image of `product`, with realistic noise.

  E.g. "Acme large crimson striped circle badge A7" or "round pin, dotted Nova #K12".
  The noun is always kept so a title is never empty by accident (empty titles are
  planted separately and recorded in the ground truth).
  """
  adjectives = []
  if rng.random() > 0.15:
    adjectives.append(_pick(SIZES[product.size][1], rng))
  if rng.random() > 0.1:
    colour = _pick(COLOURS[product.colour][1], rng)
    if product.pattern != "solid" and rng.random() < 0.3:
      accent = "white" if product.accent == "white" else _pick(COLOURS[product.accent][1], rng)
      colour = f"{colour} and {accent}"
    adjectives.append(colour)
  pattern = _pick(PATTERNS[product.pattern], rng) if rng.random() > 0.2 else ""
  if pattern:
    adjectives.append(pattern)
  if rng.random() < 0.3:  # Listings rarely agree on adjective order.
    adjectives = [adjectives[i] for i in rng.permutation(len(adjectives))]
  words = adjectives + [_pick(SHAPES[product.shape], rng), _pick(NOUNS[product.noun], rng)]
  if rng.random() < 0.8:
    words.append(_pick((product.code, f"#{product.code}", f"No. {product.code}"), rng))
  where = rng.random()
  if where < 0.6:
    words.insert(0, product.brand)
  elif where < 0.75:
    words[0] = f"{product.brand}, {words[0]}"  # A comma: the CSV must quote it.
  elif where < 0.92:
    words.append(f"by {product.brand}" if rng.random() < 0.5 else product.brand)
  title = " ".join(words)
  if rng.random() < 0.15:
    title = title.lower()
  elif rng.random() < 0.1:
    title = title.title()
  return title
