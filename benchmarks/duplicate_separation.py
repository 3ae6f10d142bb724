r"""Can an image test tell a re-upload from another product shot in the same studio pose? Pass rates.

  .venv/bin/python benchmarks/duplicate_separation.py                 # ~2 min on 2 cores
  .venv/bin/python benchmarks/duplicate_separation.py --sizes=32 --num_products=400

Pairs, each judged by the tests a near duplicate must pass once its titles agree:
  planted   the built-in catalogue's planted near duplicates (synthetic_render.near_duplicate: a
            doc shifted up to 2 px, re-encoded at JPEG quality 70-90) against their source (the
            same product's doc with the same title), at each --sizes image side;
  Myntra    pairs of different product ids sharing one title in ../shared/data/fashion_small12k
            (skipped when absent; at most 8 ids per title). Pairs whose aligned pixels are equal
            (mean difference under 1 grey level) are true duplicates and are counted apart; the
            rest are different products, which a near-duplicate test should not pass.
Tests:
  rule      duplicates.py's: perceptual hashes at most phash_max_bits apart, or centred pixel-descriptor
            cosine at least dup_min_cosine (config_schema's defaults);
  aligned   32 x 32 grayscale thumbnails at their best alignment within 2 px, mean |difference| over
            mean contrast at most t (a route tried and reverted in 8e93e67).
Also printed: the recall bound of the title rule, the planted pairs whose own or source title is
empty (only exact copies pair without a title).
"""
from __future__ import annotations

import argparse
import collections
import csv
import itertools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from input_pipeline import synthetic_catalogue  # noqa: E402
from oclear_jax.governance import category_space  # noqa: E402
from oclear_jax.governance import duplicates  # noqa: E402
from oclear_jax.governance import featurize  # noqa: E402
from oclear_jax.governance import settings as settings_lib  # noqa: E402

MYNTRA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                      "fashion_small12k")
THRESHOLDS = (0.08, 0.12, 0.2, 0.35)
_SHIFT, _SIDE = 2, 32


def _thumbnail(path: str) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.BILINEAR), np.float32)


def aligned(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """(mean |a - b| in grey levels, that over mean contrast) at the best shift within _SHIFT."""
  y = b[_SHIFT:_SIDE - _SHIFT, _SHIFT:_SIDE - _SHIFT]
  best = (np.inf, np.inf)
  for dy, dx in itertools.product(range(-_SHIFT, _SHIFT + 1), repeat=2):
    x = a[_SHIFT + dy:_SIDE - _SHIFT + dy, _SHIFT + dx:_SIDE - _SHIFT + dx]
    contrast = 0.5 * (np.abs(x - x.mean()).mean() + np.abs(y - y.mean()).mean())
    difference = float(np.abs(x - y).mean())
    best = min(best, (difference, difference / max(contrast, 1.0)))
  return best


def _judge(pairs: list[tuple[int, int]], paths: list[str], settings) -> dict[str, np.ndarray]:
  """Per pair: does the rule pass, aligned mean difference, aligned residual."""
  features = featurize.featurize_chunk(paths, settings)
  unit = category_space.unit_images(features.vectors, features.ok, features.ok)
  i, j = (np.array(side, np.int64) for side in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
  bits = duplicates._popcount(features.phash[i] ^ features.phash[j])  # pylint: disable=protected-access
  cosine = np.einsum("pd,pd->p", unit[i], unit[j])
  thumbs = {k: _thumbnail(paths[k]) for k in set(i.tolist()) | set(j.tolist())}
  measured = np.array([aligned(thumbs[a], thumbs[b]) for a, b in zip(i.tolist(), j.tolist())]).reshape(-1, 2)
  return {"rule": (bits <= settings.phash_max_bits) | (cosine >= settings.dup_min_cosine),
          "difference": measured[:, 0], "residual": measured[:, 1]}


def planted_pairs(root: str) -> tuple[list[str], list[tuple[int, int]], int, int]:
  """(image paths, (near duplicate, source) pairs with titles, planted count, planted with an empty title)."""
  rows = list(csv.DictReader(open(os.path.join(root, "catalogue.csv"), encoding="utf-8")))
  truth = {r["id"]: r for r in csv.DictReader(open(os.path.join(root, "ground_truth.csv"), encoding="utf-8"))}
  docs = [r for r in rows if r["kind"] == "doc" and r["split"] == "train"]
  sources = collections.defaultdict(list)
  for k, r in enumerate(docs):
    if "near_duplicate" not in truth[r["id"]]["noise"] and r["title"]:
      sources[(truth[r["id"]]["product"], r["title"])].append(k)
  planted = [k for k, r in enumerate(docs) if "near_duplicate" in truth[r["id"]]["noise"]]
  pairs = [(k, sources[(truth[docs[k]["id"]]["product"], docs[k]["title"])][0]) for k in planted
           if docs[k]["title"] and sources.get((truth[docs[k]["id"]]["product"], docs[k]["title"]))]
  return [os.path.join(root, r["image"]) for r in docs], pairs, len(planted), len(planted) - len(pairs)


def myntra_pairs(root: str, per_title: int = 8) -> tuple[list[str], list[tuple[int, int]]]:
  rows = list(csv.DictReader(open(os.path.join(root, "meta.csv"), encoding="utf-8")))
  by_title = collections.defaultdict(list)
  for k, r in enumerate(rows):
    if r["productDisplayName"].strip():
      by_title[" ".join(r["productDisplayName"].lower().split())].append(k)
  pairs = [p for members in by_title.values() for p in itertools.combinations(members[:per_title], 2)]
  return [os.path.join(root, r["image"]) for r in rows], pairs


def _rates(judged: dict[str, np.ndarray], keep: np.ndarray) -> list[str]:
  n = int(keep.sum())
  rate = lambda passed: f"{passed[keep].mean():.3f}" if n else "–"
  return [str(n), rate(judged["rule"])] + [rate(judged["residual"] <= t) for t in THRESHOLDS] + \
      [rate(judged["rule"] | (judged["residual"] <= t)) for t in (0.12, 0.35)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", default="workdirs/dupsep")
  parser.add_argument("--sizes", default="32,64", help="image sides of the synthetic catalogues")
  parser.add_argument("--num_products", type=int, default=1600, help="about 6.3 rows each")
  args = parser.parse_args()
  settings = settings_lib.defaults(image_features="pixels")
  header = (["pairs", "n", "rule"] + [f"aligned ≤ {t}" for t in THRESHOLDS] +
            ["rule or aligned ≤ 0.12", "rule or aligned ≤ 0.35"])
  bounds = []
  print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for side in (int(s) for s in args.sizes.split(",")):
    root = os.path.join(args.root, f"catalogue_{side}px")
    spec = synthetic_catalogue.CatalogueSpec(num_products=args.num_products, image_size=side)
    synthetic_catalogue.generate_catalogue(root, spec, progress=False)
    paths, pairs, planted, untitled = planted_pairs(root)
    judged = _judge(pairs, paths, settings)
    print(f"| planted re-uploads, {side} px | " + " | ".join(_rates(judged, np.ones(len(pairs), bool))) + " |")
    bounds.append(f"{side} px: {planted} planted, {untitled} with an empty title on either side "
              f"(title-rule recall bound {(planted - untitled) / max(planted, 1):.3f})")
  if os.path.isdir(MYNTRA):
    paths, pairs = myntra_pairs(MYNTRA)
    judged = _judge(pairs, paths, settings)
    same = judged["difference"] < 1.0
    print("| Myntra same title, equal pixels | " + " | ".join(_rates(judged, same)) + " |")
    print("| Myntra same title, different products | " + " | ".join(_rates(judged, ~same)) + " |")
  else:
    print(f"(no {MYNTRA}: the Myntra rows are skipped)")
  print("\n" + "\n".join(bounds))


if __name__ == "__main__":
  main()
