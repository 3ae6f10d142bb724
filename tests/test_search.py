"""Exact JAX top-k, the ScaNN index, and the report figures."""
import numpy as np
from PIL import Image
import pytest

from oclear_jax.retrieval import contact_sheet
from oclear_jax.retrieval import exact_top_k
from oclear_jax.retrieval import plot_recall_at_k
from oclear_jax.retrieval import recall_against_exact
from oclear_jax.retrieval import ScannIndex

from top_k_reference import numpy_top_k


def _int_vectors(rng, n, d):
  # Small integers make f32 dot products exact, so scores tie often and the
  # comparison with numpy checks tie-breaking bit for bit.
  return rng.integers(-2, 3, (n, d)).astype(np.float32)


@pytest.mark.parametrize("n,chunk,batch,k", [
    (1000, 128, 16, 10),  # N and Q not multiples of chunk / batch.
    (1000, 4096, 1024, 10),  # One chunk larger than N.
    (257, 64, 8, 100),  # k > chunk: merge across chunks carries k results.
    (5, 2, 4, 8),  # k > N: padded with -1 / -inf.
])
def test_exact_top_k_matches_numpy(n, chunk, batch, k):
  rng = np.random.default_rng(n + k)
  queries, gallery = _int_vectors(rng, 37, 8), _int_vectors(rng, n, 8)
  scores, idx = exact_top_k(queries, gallery, k, gallery_chunk=chunk, query_batch=batch)
  want_scores, want_idx = numpy_top_k(queries, gallery, k)
  assert idx.dtype == np.int32 and scores.dtype == np.float32
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(scores, want_scores.astype(np.float32))


def test_exact_top_k_real_valued():
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(50, 32)).astype(np.float32)
  gallery = rng.normal(size=(3000, 32)).astype(np.float32)
  scores, idx = exact_top_k(queries, gallery, 20, gallery_chunk=700)
  want_scores, want_idx = numpy_top_k(queries, gallery, 20)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  assert recall_against_exact(idx, want_idx) == 1.0


def test_exact_top_k_self_exclusion():
  rng = np.random.default_rng(2)
  gallery = _int_vectors(rng, 300, 8)
  ids = np.array([f"item{i}" for i in range(300)])  # Any id dtype works.
  queries, q_ids = gallery[:40], ids[:40]
  scores, idx = exact_top_k(queries, gallery, 10, gallery_chunk=64, exclude=(q_ids, ids))
  want_scores, want_idx = numpy_top_k(queries, gallery, 10, exclude=(q_ids, ids))
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(scores, want_scores.astype(np.float32))
  assert not (idx == np.arange(40)[:, None]).any()
  # With k = N the excluded item frees exactly one slot at the end.
  _, idx = exact_top_k(gallery[:3], gallery[:3], 3, exclude=(np.arange(3), np.arange(3)))
  np.testing.assert_array_equal(idx[:, -1], [-1, -1, -1])
  assert (idx[:, :2] >= 0).all()


@pytest.fixture(scope="module")
def clustered():
  """20k unit vectors around 200 overlapping centres; queries are perturbed members.

  Isotropic Gaussian vectors have no neighbourhood structure and make every
  ANN method look bad; clustered data resembles real embeddings.
  """
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(200, 64))
  labels = rng.integers(0, 200, 20_000)
  gallery = centres[labels] + 1.0 * rng.normal(size=(20_000, 64))
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  queries = gallery[rng.choice(20_000, 500, replace=False)] + 0.1 * rng.normal(size=(500, 64))
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  return gallery.astype(np.float32), queries.astype(np.float32)


@pytest.fixture(scope="module")
def built_index(clustered):
  gallery, _ = clustered
  return ScannIndex.build(gallery, k=10)


def test_scann_recall_against_exact(clustered, built_index):
  gallery, queries = clustered
  assert "tree" in built_index.description
  scores, idx = built_index.search(queries, 10)
  _, exact_idx = exact_top_k(queries, gallery, 10)
  assert idx.shape == (500, 10) and idx.dtype == np.int32
  assert recall_against_exact(idx, exact_idx) >= 0.9
  assert (np.diff(scores, axis=1) <= 1e-6).all()  # Best first.


def test_scann_save_load_round_trip(clustered, built_index, tmp_path):
  _, queries = clustered
  built_index.save(tmp_path / "index")
  loaded = ScannIndex.load(tmp_path / "index")
  assert (loaded.n, loaded.d, loaded.params) == (built_index.n, built_index.d, built_index.params)
  for a, b in zip(built_index.search(queries, 10), loaded.search(queries, 10)):
    np.testing.assert_array_equal(a, b)


def test_scann_tiny_gallery_uses_brute_force(tmp_path):
  rng = np.random.default_rng(3)
  gallery = rng.normal(size=(50, 16)).astype(np.float32)
  queries = rng.normal(size=(7, 16)).astype(np.float32)
  index = ScannIndex.build(gallery, k=5)
  assert "brute force" in index.description
  _, idx = index.search(queries, 5)
  _, exact_idx = exact_top_k(queries, gallery, 5)
  np.testing.assert_array_equal(idx, exact_idx)
  # k > N pads like exact_top_k does.
  scores, idx = index.search(queries, 60)
  assert (idx[:, 50:] == -1).all() and np.isneginf(scores[:, 50:]).all()
  index.save(tmp_path / "tiny")
  np.testing.assert_array_equal(ScannIndex.load(tmp_path / "tiny").search(queries, 5)[1], exact_idx)


def test_scann_self_exclusion():
  rng = np.random.default_rng(4)
  gallery = rng.normal(size=(50, 16)).astype(np.float32)
  ids = np.arange(50)
  _, idx = ScannIndex.build(gallery, k=5).search(gallery[:10], 5, exclude=(ids[:10], ids))
  _, want = exact_top_k(gallery[:10], gallery, 5, exclude=(ids[:10], ids))
  np.testing.assert_array_equal(idx, want)


def test_plot_recall_at_k_writes_png(tmp_path):
  path = tmp_path / "recall.png"
  plot_recall_at_k({"trained": {1: 0.5, 5: 0.7, 10: 0.8}, "untrained": {1: 0.1, 5: 0.3, 10: 0.4}},
                   path)
  with Image.open(path) as img:
    assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_contact_sheet_writes_small_png(tmp_path):
  rng = np.random.default_rng(5)
  photos = [rng.integers(0, 256, (96 + 8 * i, 72, 3), dtype=np.uint8) for i in range(6)]
  results = [[(photos[(q + j) % 6], f"0.{90 - j} A rather long product title " * 3, j % 2 == 0)
              for j in range(10)] for q in range(4)]
  path = tmp_path / "sheet.png"
  contact_sheet(photos[:4], results, path, query_captions=["query title"] * 4)
  with Image.open(path) as img:
    assert img.format == "PNG"
    assert img.width >= 11 * 128 and img.height >= 4 * 128
  assert 0 < path.stat().st_size < 1_000_000


def test_scann_search_time_knobs_trade_recall_for_speed(clustered, built_index):
  gallery, queries = clustered
  _, exact_idx = exact_top_k(queries, gallery, 10)
  leaves = built_index.params["num_leaves"]
  # Probing every leaf and re-scoring 1,000 candidates leaves nothing to chance on this data.
  _, all_leaves = built_index.search(queries, 10, leaves_to_search=leaves, reorder=1000)
  _, one_leaf = built_index.search(queries, 10, leaves_to_search=1, reorder=10)
  assert recall_against_exact(all_leaves, exact_idx) >= 0.99
  assert recall_against_exact(one_leaf, exact_idx) < recall_against_exact(all_leaves, exact_idx) - 0.1
  # Parallel search returns what the serial one does.
  for a, b in zip(built_index.search(queries, 10, parallel=True), built_index.search(queries, 10, parallel=False)):
    np.testing.assert_array_equal(a, b)


def test_scann_params_come_from_config():
  from oclear_jax import config_schema  # pylint: disable=g-import-not-at-top
  from oclear_jax.retrieval import scann_search  # pylint: disable=g-import-not-at-top
  index_cfg = config_schema.base_config().index
  rng = np.random.default_rng(6)
  gallery = rng.normal(size=(2000, 16)).astype(np.float32)
  # By default a gallery this small is searched exactly (config.index.exact_max_documents).
  default = ScannIndex.build(gallery, k=10, **scann_search.params_from_config(index_cfg))
  assert "exact_max_documents" in default.description
  index_cfg.update(num_leaves=50, num_leaves_to_search=7, reorder=60, dims_per_block=4, min_points_for_tree=100,
                   exact_max_documents=0)
  index = ScannIndex.build(gallery, k=10, **scann_search.params_from_config(index_cfg))
  assert (index.params["num_leaves"], index.params["num_leaves_to_search"], index.params["reorder"],
          index.params["dims_per_block"]) == (50, 7, 60, 4)
  assert "AH(4, 0.2)" in index.description
  forced = ScannIndex.build(gallery[:300], k=5, brute_force=True)
  _, idx = forced.search(gallery[:4], 5)
  np.testing.assert_array_equal(idx, exact_top_k(gallery[:4], gallery[:300], 5)[1])
