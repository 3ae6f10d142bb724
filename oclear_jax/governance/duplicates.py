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

The buckets are the keys of one `group_by_key` pass (executors.py): each chunk of items emits its
content hash and title bands, the values carry what checking needs (hashes, shingle codes, the f32
descriptor), and each bucket is checked where it lands (on Beam, after a `GroupByKey` shuffle across
workers). Only confirmed pairs come back; their connected components are taken on the driver.
"""
from __future__ import annotations

import dataclasses

import datasketch
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from oclear_jax.governance import category_space
from oclear_jax.governance import executors
from oclear_jax.governance import settings as settings_lib

_MAX_BUCKET = 1000
_CONTENT = -1  # the key of an item's content hash; title bands are 0.._TITLE_BANDS-1
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


def _near_pairs(sha256, phash, unit, codes, settings) -> list[tuple[int, int]]:
  """(a, b) positions, a < b, of one bucket's near-duplicate pairs: every pair checked at once."""
  if len(sha256) < 2:
    return []
  i, j = np.triu_indices(len(sha256), 1)
  close_hash = _popcount(phash[i] ^ phash[j]) <= settings.phash_max_bits
  agree = close_hash | ((unit @ unit.T)[i, j] >= settings.dup_min_cosine)
  pairs = []
  for a, b in zip(i[agree].tolist(), j[agree].tolist()):
    if sha256[a] and sha256[a] == sha256[b]:
      continue  # an exact copy: found by its content hash
    if _jaccard(codes[a], codes[b]) >= settings.dup_title_jaccard:
      pairs.append((a, b))
  return pairs


def _second_keys(phash: np.ndarray, unit: np.ndarray, settings) -> list[np.ndarray]:
  """Per item, the keys that split an oversized bucket: perceptual-hash bands, then projection bands."""
  bits = np.unpackbits(phash.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
  keys = [bits[:, positions] @ (1 << np.arange(len(positions), dtype=np.int64))
          for positions in np.array_split(np.arange(64), settings.phash_max_bits + 1)]
  planes = np.random.default_rng(0).standard_normal((unit.shape[1], _PROJECTION_BANDS * _PROJECTION_BITS))
  signs = (unit @ planes > 0).astype(np.int64).reshape(len(unit), _PROJECTION_BANDS, _PROJECTION_BITS)
  keys += list((signs @ (1 << np.arange(_PROJECTION_BITS))).T)
  return keys


def _emit_keys(chunk, shared):
  """(key, value) pairs of one chunk of readable items: (_CONTENT, sha256) -> item, and for an item with a
  title each of its MinHash bands (band, values) -> what checking the item needs."""
  items, sha256, phash, titles, vectors = chunk
  template = datasketch.MinHash(num_perm=_NUM_PERM, seed=1)  # its permutations, made once, not per title
  for k, i in enumerate(items.tolist()):
    if sha256[k]:
      yield (_CONTENT, sha256[k].encode()), i
    shingles = _shingles(titles[k])
    if shingles:
      m = datasketch.MinHash(num_perm=_NUM_PERM, seed=1, permutations=template.permutations, scheme=template.scheme)
      m.update_batch([s.encode("utf-8") for s in sorted(shingles)])
      value = (i, sha256[k], int(phash[k]), _codes(shingles), vectors[k])
      for band in range(_TITLE_BANDS):
        yield (band, m.hashvalues[band * _TITLE_ROWS:(band + 1) * _TITLE_ROWS].tobytes()), value


def _check_bucket(key, values, shared):
  """One key's confirmed pairs: exact copies of the first item of a content hash, or the near pairs of a
  title band (split by its second keys when above `_MAX_BUCKET`); None when there are none."""
  mean, settings = shared
  if key[0] == _CONTENT:
    items = sorted(values)
    return {"pairs": [(items[0], other, "exact") for other in items[1:]]} if len(items) > 1 else None
  if len(values) < 2:
    return None
  values = sorted(values, key=lambda v: v[0])  # Beam gives them in no particular order
  items = np.array([v[0] for v in values], np.int64)
  sha256 = [v[1] for v in values]
  phash = np.array([v[2] for v in values], np.uint64)
  codes = [v[3] for v in values]
  unit = category_space.unit_rows(np.stack([v[4] for v in values]), mean)
  if len(values) <= _MAX_BUCKET:
    parts, skipped = [np.arange(len(values))], 0
  else:
    parts, skipped = [], 0
    for keys in _second_keys(phash, unit, settings):
      order = np.argsort(keys, kind="stable")
      for part in np.split(order, np.flatnonzero(np.diff(keys[order])) + 1):
        skipped += len(part) > _MAX_BUCKET
        if len(part) <= _MAX_BUCKET:
          parts.append(np.sort(part))
  pairs = [(int(items[part[a]]), int(items[part[b]]), "near") for part in parts
           for a, b in _near_pairs([sha256[x] for x in part], phash[part], unit[part], [codes[x] for x in part],
                                   settings)]
  split = int(len(values) > _MAX_BUCKET)
  return {"pairs": pairs, "skipped": skipped, "split": split} if pairs or skipped or split else None


def find_duplicates(sha256: list[str], phash: np.ndarray, ok: np.ndarray, unit: category_space.UnitImages,
                    titles: list[str], settings: settings_lib.GovernanceSettings, executor) -> DuplicateGroups:
  """Duplicate groups among n items (unreadable items never take part), through `executor.group_by_key`:
  the chunks carry the f32 descriptors, and each bucket makes its members' unit rows (`unit.mean`)."""
  n = len(sha256)
  readable = np.flatnonzero(ok)
  parts = executors.row_chunks(readable, settings.chunk_size)
  chunks = ((part, [sha256[i] for i in part], phash[part], [titles[i] for i in part], unit.vectors[part])
            for part in parts)
  found = executor.group_by_key("duplicates", _emit_keys, _check_bucket, chunks, sizes=[len(p) for p in parts],
                                shared=(unit.mean, settings))
  exact = sorted(p for f in found for p in f["pairs"] if p[2] == "exact")
  near = sorted({p for f in found for p in f["pairs"] if p[2] == "near"})
  confirmed = exact + near
  skipped = sum(f.get("skipped", 0) for f in found)
  split = sum(f.get("split", 0) for f in found)

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
