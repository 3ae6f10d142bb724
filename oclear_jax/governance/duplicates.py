"""Exact and near-duplicate items: content hash, title MinHash bands, perceptual hash, embedding cosine.

A near duplicate needs agreeing titles (Jaccard of character 3-shingles at least `dup_title_jaccard`)
and agreeing images: perceptual hashes at most `phash_max_bits` bits apart, or descriptors' cosine at
least `dup_min_cosine` (a shift of a pixel or two moves a small image's perceptual hash a lot, its
descriptor little). Different shots of one product look alike too, so without agreeing titles (an
empty title) only exact copies count. Groups are connected components.

Candidates come from buckets whose expected size does not grow with the catalogue, so the pairs
examined grow with the number of items, not its square:
  * equal sha256 of the file bytes: every member is an exact copy of the first, no pairs examined;
  * equal MinHash bands of the titles (8 bands of 8 of 64 datasketch permutations): two titles of
    Jaccard 0.9 share a band with probability 0.99, of 0.95 with 0.9998, of 0.6 with 0.13 and of
    0.3 with 0.0005. Every pair of a bucket is checked at once (vectorised hash distances and
    cosines, then exact Jaccard).
A bucket above `_MAX_BUCKET` items (one title repeated thousands of times) is split by a second key
that near duplicates share: each band of the perceptual hash (`phash_max_bits + 1` bands: two hashes
at most that many bits apart share one, by pigeonhole) and each band of a sign-of-random-projection
hash of the descriptor (for the cosine route). Only a part still above the limit is skipped, and the
report counts it.
"""
from __future__ import annotations

import collections
import dataclasses

import datasketch
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from oclear_jax.governance import settings as settings_lib

_MAX_BUCKET = 1000
_NUM_PERM = 64
_TITLE_BANDS, _TITLE_ROWS = 8, 8  # of the _NUM_PERM MinHash values
_PROJECTION_BANDS, _PROJECTION_BITS = 8, 4  # cos 0.85: a band agrees with p ~0.46, all 8 miss with p ~0.007


@dataclasses.dataclass
class DuplicateGroups:
  group: np.ndarray  # i64[n]: component id, -1 for items without a duplicate
  kind: list[str]  # per item: 'exact', 'near' or ''
  pairs: list[tuple[int, int, str]]  # confirmed (i, j, kind); an exact copy pairs with its group's first item
  skipped_buckets: int
  split_buckets: int = 0  # oversized title buckets checked through their second key instead


def _shingles(title: str) -> set[str]:
  text = " ".join(title.lower().split())
  return {text[i:i + 3] for i in range(max(1, len(text) - 2))} if text else set()


def _codes(shingles: set[str]) -> np.ndarray:
  """i64[k] sorted: each shingle as one integer, 21 bits per character (code point + 1; 0 = no character), so
  two shingles are equal exactly when their codes are: 8 bytes a shingle instead of a Python string in a set."""
  points = np.array([[ord(c) + 1 for c in s.ljust(3, "\0")] for s in shingles], np.int64).reshape(-1, 3)
  points[points == 1] = 0  # the padding
  return np.unique((points[:, 0] << 42) | (points[:, 1] << 21) | points[:, 2])


def _jaccard(s: np.ndarray, t: np.ndarray) -> float:
  common = len(np.intersect1d(s, t, assume_unique=True))
  return common / (len(s) + len(t) - common)


def _popcount(x: np.ndarray) -> np.ndarray:
  return np.unpackbits(x.astype(">u8").view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


class _Checker:
  """Checks every pair of one bucket at once; collects confirmed near pairs."""

  def __init__(self, sha256, phash, unit_vectors, codes, settings):
    self.sha256, self.phash, self.unit, self.codes, self.settings = sha256, phash, unit_vectors, codes, settings
    self.pairs: set[tuple[int, int]] = set()

  def check(self, members: np.ndarray) -> None:
    if len(members) < 2:
      return
    upper = np.triu_indices(len(members), 1)
    i, j = members[upper[0]], members[upper[1]]
    close_hash = _popcount(self.phash[i] ^ self.phash[j]) <= self.settings.phash_max_bits
    x = self.unit[members]
    agree = close_hash | ((x @ x.T)[upper] >= self.settings.dup_min_cosine)
    for a, b in zip(i[agree].tolist(), j[agree].tolist()):
      if self.sha256[a] and self.sha256[a] == self.sha256[b]:
        continue  # an exact copy: found by its content hash
      s, t = self.codes[a], self.codes[b]
      if s is not None and t is not None and _jaccard(s, t) >= self.settings.dup_title_jaccard:
        self.pairs.add((min(a, b), max(a, b)))


def _title_bands(titles, readable) -> tuple[dict[tuple[int, bytes], list[int]], list[np.ndarray | None]]:
  """({(band, band value): items} over the items with a title, each item's shingle codes or None)."""
  buckets = collections.defaultdict(list)
  codes: list[np.ndarray | None] = [None] * len(titles)
  template = datasketch.MinHash(num_perm=_NUM_PERM, seed=1)  # its permutations, made once, not per title
  for i in readable:
    shingles = _shingles(titles[i])
    if shingles:
      m = datasketch.MinHash(num_perm=_NUM_PERM, seed=1, permutations=template.permutations, scheme=template.scheme)
      m.update_batch([s.encode("utf-8") for s in sorted(shingles)])
      for band in range(_TITLE_BANDS):
        buckets[(band, m.hashvalues[band * _TITLE_ROWS:(band + 1) * _TITLE_ROWS].tobytes())].append(int(i))
      codes[i] = _codes(shingles)
  return buckets, codes


def _second_keys(phash: np.ndarray, unit_vectors, settings) -> list[np.ndarray]:
  """Per item, the keys that split an oversized bucket: perceptual-hash bands, then projection bands."""
  n = len(phash)
  bits = np.unpackbits(phash.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1) if n else np.zeros((0, 64), np.uint8)
  keys = [bits[:, positions] @ (1 << np.arange(len(positions), dtype=np.int64))
          for positions in np.array_split(np.arange(64), settings.phash_max_bits + 1)]
  planes = np.random.default_rng(0).standard_normal((unit_vectors.shape[1], _PROJECTION_BANDS * _PROJECTION_BITS))
  step = 8 * _MAX_BUCKET  # rows at a time: unit_vectors may make its rows on demand
  signs = np.concatenate([unit_vectors[i:i + step] @ planes > 0 for i in range(0, max(n, 1), step)])
  signs = signs.astype(np.int64).reshape(n, _PROJECTION_BANDS, _PROJECTION_BITS)
  keys += list((signs @ (1 << np.arange(_PROJECTION_BITS))).T)
  return keys


def find_duplicates(sha256: list[str], phash: np.ndarray, ok: np.ndarray, unit_vectors,
                    titles: list[str], settings: settings_lib.GovernanceSettings) -> DuplicateGroups:
  """Duplicate groups among n items (unreadable items never take part). `unit_vectors`: f64[n, D] or anything
  indexed like it (category_space.UnitImages)."""
  n = len(sha256)
  readable = np.flatnonzero(ok)
  confirmed: list[tuple[int, int, str]] = []
  by_content = collections.defaultdict(list)
  for i in readable:
    if sha256[i]:
      by_content[sha256[i]].append(int(i))
  for members in by_content.values():
    confirmed += [(members[0], other, "exact") for other in members[1:]]

  buckets, codes = _title_bands(titles, readable)
  checker = _Checker(sha256, phash, unit_vectors, codes, settings)
  skipped = split = 0
  second = None
  for members in buckets.values():
    members = np.asarray(members, np.int64)
    if len(members) <= _MAX_BUCKET:
      checker.check(members)
      continue
    split += 1
    second = _second_keys(phash, unit_vectors, settings) if second is None else second
    for keys in second:
      order = np.argsort(keys[members], kind="stable")
      values = keys[members][order]
      for part in np.split(members[order], np.flatnonzero(np.diff(values)) + 1):
        if len(part) > _MAX_BUCKET:
          skipped += 1
        else:
          checker.check(part)
  confirmed += [(i, j, "near") for i, j in sorted(checker.pairs)]

  group = np.full(n, -1, np.int64)
  kind = [""] * n
  if confirmed:
    edges = np.array([(i, j) for i, j, _ in confirmed])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    involved = np.unique(edges)
    group[involved] = component[involved]
    for i, j, k in confirmed:
      for x in (i, j):
        kind[x] = "exact" if k == "exact" or kind[x] == "exact" else "near"
  return DuplicateGroups(group=group, kind=kind, pairs=confirmed, skipped_buckets=skipped, split_buckets=split)
