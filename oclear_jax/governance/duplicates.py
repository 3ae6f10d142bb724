"""Exact and near-duplicate items: content hash, perceptual hash, embedding cosine, title MinHash.

Candidate pairs come from buckets, never from all pairs:
  * equal sha256 of the file bytes (exact duplicates);
  * equal bands of the 64-bit perceptual hash: with `phash_max_bits + 1` bands, two hashes that
    differ in at most `phash_max_bits` bits share a band (pigeonhole), so no near pair is missed;
  * datasketch MinHash-LSH over character 3-shingles of the titles (near-identical titles).
A candidate is a near duplicate when the titles agree (Jaccard of shingles at least
`dup_title_jaccard`) and the images agree: perceptual hashes at most `phash_max_bits` bits apart,
or descriptors' cosine at least `dup_min_cosine` (a shift of a pixel or two moves a small image's
perceptual hash a lot, its descriptor little). Different shots of one product look alike too, so
without agreeing titles (an empty title) only exact copies count. Groups are connected components.
Buckets over `_MAX_BUCKET` items (blank or placeholder images) are skipped and counted, not
expanded into millions of pairs.
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


@dataclasses.dataclass
class DuplicateGroups:
  group: np.ndarray  # i64[n]: component id, -1 for items without a duplicate
  kind: list[str]  # per item: 'exact', 'near' or ''
  pairs: list[tuple[int, int, str]]  # confirmed (i, j, kind)
  skipped_buckets: int


def _shingles(title: str) -> set[str]:
  text = " ".join(title.lower().split())
  return {text[i:i + 3] for i in range(max(1, len(text) - 2))} if text else set()


def _popcount(x: np.ndarray) -> np.ndarray:
  return np.unpackbits(x.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).sum(1)


def find_duplicates(sha256: list[str], phash: np.ndarray, ok: np.ndarray, unit_vectors: np.ndarray,
                    titles: list[str], settings: settings_lib.GovernanceSettings) -> DuplicateGroups:
  """Duplicate groups among n items (unreadable items never take part)."""
  n = len(sha256)
  candidates: set[tuple[int, int]] = set()
  skipped = 0

  def add_bucket(members: list[int]) -> None:
    nonlocal skipped
    if len(members) > _MAX_BUCKET:
      skipped += 1
      return
    for x in range(len(members)):
      for y in range(x + 1, len(members)):
        candidates.add((members[x], members[y]))

  buckets = collections.defaultdict(list)
  readable = np.flatnonzero(ok)
  for i in readable:
    buckets[("sha", sha256[i])].append(int(i))
  bands = np.array_split(np.arange(64), settings.phash_max_bits + 1)
  bits = np.unpackbits(phash.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1) if n else np.zeros((0, 64), np.uint8)
  for b, positions in enumerate(bands):
    keys = np.packbits(bits[:, positions], axis=1)
    for i in readable:
      buckets[("phash", b, keys[i].tobytes())].append(int(i))
  shingles = [_shingles(t) for t in titles]
  lsh = datasketch.MinHashLSH(threshold=settings.dup_title_jaccard, num_perm=_NUM_PERM)
  signatures = {}
  for i in readable:
    if shingles[i]:
      m = datasketch.MinHash(num_perm=_NUM_PERM, seed=1)
      m.update_batch([s.encode("utf-8") for s in sorted(shingles[i])])
      signatures[int(i)] = m
      lsh.insert(str(i), m)
  for members in buckets.values():
    add_bucket(members)
  for i, m in signatures.items():
    add_bucket(sorted({i, *(int(j) for j in lsh.query(m))}))

  confirmed = []
  for i, j in sorted(candidates):
    if sha256[i] and sha256[i] == sha256[j]:
      confirmed.append((i, j, "exact"))
      continue
    a, b = shingles[i], shingles[j]
    if not a or not b or len(a & b) / len(a | b) < settings.dup_title_jaccard:
      continue
    close_hash = _popcount(np.array([phash[i] ^ phash[j]], np.uint64))[0] <= settings.phash_max_bits
    if close_hash or float(unit_vectors[i] @ unit_vectors[j]) >= settings.dup_min_cosine:
      confirmed.append((i, j, "near"))
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
  return DuplicateGroups(group=group, kind=kind, pairs=confirmed, skipped_buckets=skipped)
