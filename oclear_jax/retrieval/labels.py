"""Query labels for the retrieval metrics: one label per query, or several.

A shopper's photo may show one product or a set of them (Product1M's "multi-product"
queries: a lipstick, a cushion and a brush in one picture). A gallery document is one
product, so it has exactly one label; a query has a *list* of labels, and a document is
relevant to the query when its label is in that list.

Every metric works on the same encoding, built once per call:

* query labels and gallery labels are mapped onto shared dense integer codes (labels
  may be ints, strings or bytes);
* a query's labels become distinct ``(query, label)`` pairs, each with its
  multiplicity (a photo of two identical lipsticks lists the label twice; only mAR@R
  uses the count);
* single-label input (a 1-D array) is detected and keeps a fast path.

Accepted forms of ``query_labels``: a 1-D array (one label per query), a 2-D array
(the same number of labels for every query), or a sequence whose items are either a
scalar label or a sequence of labels (ragged; an empty list means "no label").
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class EncodedLabels:
  """Queries' label pairs and gallery labels on shared codes (see the module docstring)."""
  num_queries: int
  num_codes: int
  owner: np.ndarray  # int64[M] the query of each distinct (query, label) pair, ascending
  code: np.ndarray  # int64[M] the pair's label code
  multiplicity: np.ndarray  # int64[M] how often the query lists that label
  labels_per_query: np.ndarray  # int64[Q] labels listed per query, repeats included
  gallery_code: np.ndarray  # int64[N]
  single: bool  # exactly one label per query: owner == arange(Q)

  @property
  def pair_keys(self) -> np.ndarray:
    return self.owner * self.num_codes + self.code


def _is_scalar(value) -> bool:
  return isinstance(value, (str, bytes)) or np.ndim(value) == 0


def _flatten(query_labels) -> tuple[np.ndarray, np.ndarray, int]:
  """(owner int64[M'], label values [M'], Q), one entry per listed label."""
  if not isinstance(query_labels, np.ndarray):
    try:
      as_array = np.asarray(query_labels)
    except ValueError:  # ragged lists
      as_array = None
    if as_array is not None and as_array.dtype != object and as_array.ndim in (1, 2):
      query_labels = as_array
  if isinstance(query_labels, np.ndarray) and query_labels.dtype != object:
    if query_labels.ndim == 1:
      return np.arange(len(query_labels), dtype=np.int64), query_labels, len(query_labels)
    if query_labels.ndim == 2:
      q, per = query_labels.shape
      return np.repeat(np.arange(q, dtype=np.int64), per), query_labels.reshape(-1), q
    raise ValueError(f"query labels must be 1-D or 2-D, got shape {query_labels.shape}")
  owners, flat = [], []
  for q, labels in enumerate(query_labels):
    labels = [labels] if _is_scalar(labels) else list(labels)
    owners.extend([q] * len(labels))
    flat.extend(labels)
  return np.asarray(owners, np.int64), np.asarray(flat), len(query_labels)


def encode(query_labels, gallery_labels: np.ndarray) -> EncodedLabels:
  """Encodes query labels (any accepted form) and 1-D gallery labels on shared codes."""
  gallery_labels = np.asarray(gallery_labels)
  if gallery_labels.ndim != 1:
    raise ValueError(f"gallery labels must be 1-D (one product per document), got {gallery_labels.shape}")
  owner, flat, num_q = _flatten(query_labels)
  if not len(flat):
    flat = flat.astype(gallery_labels.dtype)
  _, codes = np.unique(np.concatenate([flat, gallery_labels]), return_inverse=True)
  codes = codes.reshape(-1).astype(np.int64)
  q_code, g_code = codes[:len(flat)], codes[len(flat):]
  num_codes = int(codes.max(initial=-1)) + 1
  keys, counts = np.unique(owner * num_codes + q_code, return_counts=True)
  pair_owner = keys // max(num_codes, 1)
  single = len(keys) == num_q and np.array_equal(pair_owner, np.arange(num_q))
  return EncodedLabels(
      num_queries=num_q, num_codes=num_codes, owner=pair_owner, code=keys - pair_owner * num_codes,
      multiplicity=counts.astype(np.int64), labels_per_query=np.bincount(owner, minlength=num_q).astype(np.int64),
      gallery_code=g_code, single=bool(single))


def _lookup(keys: np.ndarray, table_keys: np.ndarray, table_values: np.ndarray) -> np.ndarray:
  """table_values at keys' positions in sorted table_keys, 0 where absent."""
  if not len(table_keys):
    return np.zeros(len(keys), np.int64)
  pos = np.minimum(np.searchsorted(table_keys, keys), len(table_keys) - 1)
  return np.where(table_keys[pos] == keys, table_values[pos], 0).astype(np.int64)


def _id_codes(query_ids, gallery_ids) -> tuple[np.ndarray, np.ndarray]:
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  _, codes = np.unique(np.concatenate([query_ids, gallery_ids]), return_inverse=True)
  codes = codes.reshape(-1).astype(np.int64)
  return codes[:len(query_ids)], codes[len(query_ids):]


def check_ids(query_ids, gallery_ids) -> None:
  if (query_ids is None) != (gallery_ids is None):
    raise ValueError("pass both query_ids and gallery_ids, or neither")


def self_mask(retrieved: np.ndarray, query_ids, gallery_ids) -> np.ndarray:
  """bool[Q, K]: the slot holds the query itself (same id); all False without ids."""
  check_ids(query_ids, gallery_ids)
  if query_ids is None:
    return np.zeros(retrieved.shape, bool)
  safe = np.where(retrieved >= 0, retrieved, 0)
  return (retrieved >= 0) & (np.asarray(gallery_ids)[safe] == np.asarray(query_ids)[:, None])


def relevance(enc: EncodedLabels, retrieved: np.ndarray, query_ids=None, gallery_ids=None) -> np.ndarray:
  """bool[Q, K]: slot holds a document whose label the query lists (never the query itself)."""
  retrieved = np.asarray(retrieved)
  if retrieved.ndim != 2 or retrieved.shape[0] != enc.num_queries:
    raise ValueError(f"retrieved must be [Q={enc.num_queries}, K], got {retrieved.shape}")
  valid = retrieved >= 0
  g = enc.gallery_code[np.where(valid, retrieved, 0)]
  if enc.single:
    rel = valid & (g == enc.code[:, None])
  else:
    rows = np.arange(enc.num_queries, dtype=np.int64)[:, None]
    rel = valid & np.isin(rows * enc.num_codes + g, enc.pair_keys)
  return rel & ~self_mask(retrieved, query_ids, gallery_ids)


def gallery_count_per_pair(enc: EncodedLabels, query_ids=None, gallery_ids=None) -> np.ndarray:
  """int64[M]: documents with each pair's label, minus the query itself (leave-one-out)."""
  check_ids(query_ids, gallery_ids)
  counts = np.bincount(enc.gallery_code, minlength=enc.num_codes)[enc.code].astype(np.int64)
  if query_ids is not None:
    q_id, g_id = _id_codes(query_ids, gallery_ids)
    if len(q_id) != enc.num_queries or len(g_id) != len(enc.gallery_code):
      raise ValueError("query_ids must be [Q] and gallery_ids [N]")
    # One key per (id, label): a query's self-matches share both its id and the label.
    g_keys, g_counts = np.unique(g_id * enc.num_codes + enc.gallery_code, return_counts=True)
    counts -= _lookup(q_id[enc.owner] * enc.num_codes + enc.code, g_keys, g_counts)
  return counts


def positives_per_query(enc: EncodedLabels, query_ids=None, gallery_ids=None) -> np.ndarray:
  """int64[Q]: distinct relevant documents of each query (R of MAP@R, Product1M's |pos set|)."""
  per_pair = gallery_count_per_pair(enc, query_ids, gallery_ids)
  return np.bincount(enc.owner, weights=per_pair, minlength=enc.num_queries).astype(np.int64)


def retrieved_count_per_pair(enc: EncodedLabels, retrieved: np.ndarray, depth: int, query_ids=None,
                             gallery_ids=None) -> np.ndarray:
  """int64[M]: documents of each pair's label among the query's first `depth` slots."""
  top = np.asarray(retrieved)[:, :depth]
  keep = (top >= 0) & ~self_mask(top, query_ids, gallery_ids)
  rows = np.broadcast_to(np.arange(enc.num_queries, dtype=np.int64)[:, None], top.shape)
  slot_keys = rows[keep] * enc.num_codes + enc.gallery_code[top[keep]]
  table, counts = np.unique(slot_keys, return_counts=True)
  return _lookup(enc.pair_keys, table, counts)
