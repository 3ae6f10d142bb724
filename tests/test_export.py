"""Embedding export: shards, resumption after a kill, torn shards, duplicate ids; streamed exact search."""
import os

import numpy as np
import pytest

from oclear_jax.serving import export
from oclear_jax.retrieval import exact_search

TOTAL, SHARD, BATCH, DIM = 50, 16, 7, 4


def _vector(rows):
  """The 'model': a fixed function of the row number, so any redone row must come out identical."""
  rows = np.asarray(rows, np.float32)[:, None]
  return np.concatenate([rows, rows ** 0.5, np.sin(rows), np.ones_like(rows)], axis=1).astype(np.float32)


class _Source:
  """Batches of BATCH rows from any start row; records the starts and the rows embedded."""

  def __init__(self, ids=None, fail_after=None):
    self.ids = ids if ids is not None else [f"doc{i}" for i in range(TOTAL)]
    self.fail_after = fail_after
    self.starts, self.embedded = [], []

  def __call__(self, start):
    self.starts.append(start)
    for s in range(start, TOTAL, BATCH):
      if self.fail_after is not None and s >= self.fail_after:
        raise KeyboardInterrupt("killed")  # what a preempted job looks like from inside
      rows = np.arange(s, min(s + BATCH, TOTAL))
      yield {"row": rows, "id": np.array([self.ids[i].encode() for i in rows], dtype=object),
             "title": np.array([f"title {i}" for i in rows])}

  def embed(self, batch):
    self.embedded.extend(batch["row"].tolist())
    return _vector(batch["row"])


def _export(directory, source, fingerprint="model-a"):
  return export.export_embeddings(str(directory), source, TOTAL, source.embed, columns=("id", "title"),
                                  shard_size=SHARD, fingerprint=fingerprint, progress=False)


def _check_content(exported):
  assert exported.num_rows == TOTAL and exported.dim == DIM and exported.num_shards == 4
  np.testing.assert_array_equal(exported.vectors(), _vector(np.arange(TOTAL)))
  assert exported.column("id").tolist() == [f"doc{i}".encode() for i in range(TOTAL)]
  assert exported.column("title")[7] == b"title 7"
  assert [len(b) for b in exported.blocks()] == [16, 16, 16, 2]


def _mtimes(directory):
  return {n: os.stat(os.path.join(directory, n)).st_mtime_ns for n in os.listdir(directory) if n.startswith("shard")}


def test_killed_export_resumes_at_the_first_unfinished_shard(tmp_path):
  killed = _Source(fail_after=35)  # dies while embedding shard 2 (rows 32..47)
  with pytest.raises(KeyboardInterrupt):
    _export(tmp_path, killed)
  with pytest.raises(ValueError, match="incomplete"):
    export.ExportedEmbeddings(str(tmp_path))
  rerun = _Source()
  _check_content(_export(tmp_path, rerun))
  # Shards 0 and 1 (rows 0..31) were kept: the rerun starts at row 32 and embeds nothing before it.
  assert rerun.starts == [32] and min(rerun.embedded) == 32 and sorted(rerun.embedded) == list(range(32, TOTAL))


def test_deleted_or_truncated_shard_is_redone_alone(tmp_path):
  _export(tmp_path, _Source())
  before = _mtimes(tmp_path)
  os.remove(tmp_path / "shard-00001.vectors.npy")
  path = tmp_path / "shard-00002.title.npy"
  path.write_bytes(path.read_bytes()[:-5])  # a torn file: header intact, data cut short
  rerun = _Source()
  _check_content(_export(tmp_path, rerun))
  assert rerun.starts == [16]  # one run over shards 1..2
  # Batches of 7 from row 16 end with rows 44..49: the source stops after the batch holding row 47.
  assert rerun.embedded == list(range(16, 50))
  after = _mtimes(tmp_path)
  for name in before:
    changed = before[name] != after[name]
    assert changed == (name.startswith(("shard-00001", "shard-00002"))), name
  # A finished export is not touched at all.
  again = _Source()
  _export(tmp_path, again)
  assert again.starts == [] and again.embedded == []


def test_another_fingerprint_starts_afresh(tmp_path):
  _export(tmp_path, _Source())
  rerun = _Source()
  _check_content(_export(tmp_path, rerun, fingerprint="model-b"))
  assert sorted(rerun.embedded) == list(range(TOTAL))


def test_duplicate_ids_name_the_id_and_rows(tmp_path):
  ids = [f"doc{i}" for i in range(TOTAL)]
  ids[40] = "doc3"
  with pytest.raises(ValueError, match=r"duplicate gallery id 'doc3' at rows 3 and 40"):
    _export(tmp_path, _Source(ids=ids))


def test_device_embedder_pads_the_last_batch_and_cuts_it_off():
  seen = []

  def predict(params, batch):
    seen.append(batch["image"].shape)
    return {"doc": batch["image"].sum(axis=(1, 2, 3))[:, None] * params, "query": None}

  embed = export.device_embedder(predict, 2.0, lambda b: b, batch_size=8, head="doc", inputs=("image",))
  images = np.arange(5 * 2 * 2 * 1, dtype=np.float32).reshape(5, 2, 2, 1)
  out = embed({"image": images})
  assert seen == [(8, 2, 2, 1)]  # one static shape
  np.testing.assert_allclose(out[:, 0], images.sum(axis=(1, 2, 3)) * 2.0)


def test_exact_search_streams_shards_like_one_gallery(tmp_path):
  rng = np.random.default_rng(0)
  gallery = rng.integers(-2, 3, (TOTAL, DIM)).astype(np.float32)  # small integers: exact scores, many ties
  source = _Source()
  source.embed = lambda batch: gallery[batch["row"]]
  exported = _export(tmp_path, source)
  queries = rng.integers(-2, 3, (9, DIM)).astype(np.float32)
  scores, idx = exact_search.exact_top_k_blocks(queries, exported.blocks(), 12, gallery_chunk=8, query_batch=4)
  full = queries.astype(np.float64) @ gallery.astype(np.float64).T
  want = np.argsort(-full, axis=1, kind="stable")[:, :12]  # lower index first among ties
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_array_equal(scores, np.take_along_axis(full, want, axis=1).astype(np.float32))
  # Leave-one-out across shard boundaries: a query never finds its own row.
  ids = exported.column("id")
  _, idx = exact_search.exact_top_k_blocks(gallery[14:20], exported.blocks(), 5, gallery_chunk=8,
                                           exclude=(ids[14:20], ids))
  assert not (idx == np.arange(14, 20)[:, None]).any()
