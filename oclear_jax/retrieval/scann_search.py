"""Approximate top-k search with ScaNN, for galleries too large to brute-force.

The untuned defaults follow ScaNN's recipe for dot-product search on normalised
embeddings: a k-means tree (about sqrt(n) leaves, search about 10 % of them),
anisotropic hashing (2 dims per block, threshold 0.2) and exact re-scoring of the
best few hundred candidates. What recall that gives depends on the data (0.37 on a
1,319-document demo gallery, 0.75 on 1M noisy clustered vectors): an index meant
for users is tuned to a recall target on its own embeddings (`index_tuning`), which
stores the chosen search depth in `params` so that every later search uses it.

Small galleries use ScaNN's brute-force scorer, which is exact: below
`exact_max_documents` (config) exhaustive search is fast anyway, and below
`MIN_POINTS_FOR_TREE` the tree's k-means and the AH codebooks cannot be trained.
`ScannIndex.description` says which path was taken. Brute-force results are made
deterministic under ties (lower gallery index first, like `exact_search`; see
`_search_exact`), so they equal the exact reference.

Every knob has a config field (`config.index`, see `params_from_config`); the
search-time ones (leaves to search, reorder depth) can also be overridden per call
without rebuilding, which is how the tuner sweeps them and how `--mode=search
--search.leaves=N --search.reorder=M` deepens one search.

`scann` is imported lazily because importing it also loads TensorFlow (a few
seconds), which users of the exact search should not pay for.
"""
import json
import math
import os
import tempfile
from typing import Any

import numpy as np

from input_pipeline import paths

MIN_POINTS_FOR_TREE = 1000
_SIDECAR = "oclear_index.json"


def _scann_ops():
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top  (loads TF)
  return scann_ops_pybind


def params_from_config(index_cfg) -> dict[str, Any]:
  """`ScannIndex.build` keyword arguments from `config.index` (0 means "the default")."""
  return {
      "num_leaves": index_cfg.num_leaves or None,
      "num_leaves_to_search": index_cfg.num_leaves_to_search or None,
      "reorder": index_cfg.reorder or None,
      "training_sample_size": index_cfg.training_sample_size or None,
      "dims_per_block": index_cfg.dims_per_block,
      "anisotropic_threshold": index_cfg.anisotropic_threshold,
      "min_points_for_tree": index_cfg.min_points_for_tree,
      "soar_lambda": index_cfg.soar_lambda or None,
      "spherical": index_cfg.spherical,
      "exact_max_documents": index_cfg.exact_max_documents,
  }


def _resolve_params(
    n: int,
    k: int,
    num_leaves: int | None = None,
    num_leaves_to_search: int | None = None,
    reorder: int | None = None,
    training_sample_size: int | None = None,
    dims_per_block: int = 2,
    anisotropic_threshold: float = 0.2,
    min_points_for_tree: int = MIN_POINTS_FOR_TREE,
    soar_lambda: float | None = None,
    spherical: bool = False,
    exact_max_documents: int = 0,
) -> dict[str, Any]:
  """Fills in defaults and clips them to what a gallery of n points supports."""
  if n < min_points_for_tree:
    return {"mode": "brute_force", "k": k, "min_points_for_tree": min_points_for_tree}
  if n <= exact_max_documents:
    return {"mode": "brute_force", "k": k, "exact_max_documents": int(exact_max_documents)}
  leaves = num_leaves if num_leaves is not None else round(math.sqrt(n))
  leaves = int(min(max(leaves, 1), n))
  to_search = num_leaves_to_search if num_leaves_to_search is not None else max(1, leaves // 10)
  to_search = int(min(max(to_search, 1), leaves))
  reorder_k = reorder if reorder is not None else max(100, 4 * k)
  reorder_k = int(min(max(reorder_k, k), n))
  sample = training_sample_size if training_sample_size is not None else min(n, 100_000)
  sample = int(min(max(sample, leaves), n))
  return {
      "mode": "tree_ah",
      "k": k,
      "num_leaves": leaves,
      "num_leaves_to_search": to_search,
      "reorder": reorder_k,
      "training_sample_size": sample,
      "dims_per_block": int(dims_per_block),
      "anisotropic_threshold": float(anisotropic_threshold),
      "soar_lambda": float(soar_lambda) if soar_lambda else None,
      "spherical": bool(spherical),
  }


def _describe(n: int, d: int, params: dict[str, Any]) -> str:
  tuned = params.get("tuned")
  if tuned:
    return f"{_describe(n, d, {**params, 'tuned': None})}; {tuned['why']}"
  if params.get("forced"):
    return f"ScaNN brute force over {n} x {d} (exact)"
  if params["mode"] == "brute_force" and params.get("exact_max_documents"):
    return (f"ScaNN brute force over {n} x {d} (exact: gallery of at most {params['exact_max_documents']} "
            "documents, config.index.exact_max_documents)")
  if params["mode"] == "brute_force":
    return (f"ScaNN brute force over {n} x {d} (gallery below "
            f"{params.get('min_points_for_tree', MIN_POINTS_FOR_TREE)} points: too small to train a tree "
            "and AH codebooks)")
  extras = "".join([", spherical" if params.get("spherical") else "",
                    f", SOAR {params['soar_lambda']}" if params.get("soar_lambda") else ""])
  return (f"ScaNN tree({params['num_leaves']} leaves, search {params['num_leaves_to_search']}, "
          f"trained on {params['training_sample_size']}{extras}) + AH({params.get('dims_per_block', 2)}, "
          f"{params.get('anisotropic_threshold', 0.2)}) + reorder({params['reorder']}) over {n} x {d}")


def _drop_self(idx: np.ndarray, scores: np.ndarray, exclude) -> tuple[np.ndarray, np.ndarray]:
  """Removes each query's own gallery item (same id), keeping the rest in order (-1 / -inf at the end)."""
  q_ids, g_ids = np.asarray(exclude[0]), np.asarray(exclude[1])
  is_self = (idx >= 0) & (g_ids[np.maximum(idx, 0)] == q_ids[:, None])
  # Stable sort moves self-matches to the end, keeping the rest in order.
  order = np.argsort(is_self, axis=1, kind="stable")
  idx = np.take_along_axis(np.where(is_self, -1, idx), order, axis=1)
  scores = np.take_along_axis(np.where(is_self, -np.inf, scores), order, axis=1)
  return idx, scores


class ScannIndex:
  """A ScaNN searcher plus the metadata needed to use and reload it.

  Build with `ScannIndex.build`, reload with `ScannIndex.load`; the
  constructor only wraps an existing searcher.
  """

  def __init__(self, searcher: Any, n: int, d: int, params: dict[str, Any]):
    self._searcher = searcher
    self.n = n
    self.d = d
    self.params = dict(params)
    self.description = _describe(n, d, params)

  @classmethod
  def build(
      cls,
      gallery: np.ndarray,
      *,
      k: int,
      num_leaves: int | None = None,
      num_leaves_to_search: int | None = None,
      reorder: int | None = None,
      training_sample_size: int | None = None,
      dims_per_block: int = 2,
      anisotropic_threshold: float = 0.2,
      min_points_for_tree: int = MIN_POINTS_FOR_TREE,
      soar_lambda: float | None = None,
      spherical: bool = False,
      exact_max_documents: int = 0,
      brute_force: bool = False,
  ) -> "ScannIndex":
    """Trains a dot-product index on gallery f32[N, d].

    Args:
      gallery: f32[N, d] embeddings (L2-normalised for cosine search).
      k: default number of neighbours; also sizes the default reorder depth.
      num_leaves: tree leaves; default round(sqrt(N)), clipped to [1, N].
      num_leaves_to_search: leaves probed per query; default
        max(1, num_leaves // 10).
      reorder: candidates exactly re-scored; default max(100, 4k), clipped to
        [k, N].
      training_sample_size: points used to train the tree; default
        min(N, 100k).
      dims_per_block: dimensions per AH sub-space (2 is ScaNN's recommendation;
        more is faster and coarser).
      anisotropic_threshold: AH's anisotropic quantization threshold.
      min_points_for_tree: below this many points, brute force is used.
      soar_lambda: SOAR spilling (each point also joins a second, "orthogonal"
        leaf; ScaNN suggests 1.5): better recall per leaf searched for about
        twice the build time and scanned points. None: off.
      spherical: spherical k-means for the tree (unit-norm data).
      exact_max_documents: galleries of at most this many points use the
        exact brute-force scorer (0: only below `min_points_for_tree`).
      brute_force: force ScaNN's exact brute-force scorer (a baseline).

    Returns:
      The built index; see `description` for the configuration chosen.
    """
    gallery = np.ascontiguousarray(gallery, np.float32)
    if gallery.ndim != 2 or gallery.shape[0] == 0:
      raise ValueError(f"gallery must be a non-empty [N, d] array, got {gallery.shape}")
    n, d = gallery.shape
    if brute_force:
      params = {"mode": "brute_force", "k": k, "forced": True}
    else:
      params = _resolve_params(n, k, num_leaves, num_leaves_to_search, reorder, training_sample_size,
                               dims_per_block, anisotropic_threshold, min_points_for_tree, soar_lambda, spherical,
                               exact_max_documents)
    builder = _scann_ops().builder(gallery, k, "dot_product")
    if params["mode"] == "brute_force":
      builder = builder.score_brute_force()
    else:
      builder = builder.tree(
          num_leaves=params["num_leaves"],
          num_leaves_to_search=params["num_leaves_to_search"],
          training_sample_size=params["training_sample_size"],
          spherical=params["spherical"],
          soar_lambda=params["soar_lambda"],
      ).score_ah(params["dims_per_block"],
                 anisotropic_quantization_threshold=params["anisotropic_threshold"]).reorder(params["reorder"])
    return cls(builder.build(), n, d, params)

  def search(
      self,
      queries: np.ndarray,
      k: int | None = None,
      *,
      exclude: tuple[np.ndarray, np.ndarray] | None = None,
      leaves_to_search: int | None = None,
      reorder: int | None = None,
      parallel: bool | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k by dot product, same contract as `exact_top_k`.

    Args:
      queries: f32[Q, d].
      k: results per query (default: the k given to `build`). Slots ScaNN
        cannot fill (k > N) hold index -1 and score -inf.
      exclude: optional ``(query_ids [Q], gallery_ids [N])``; a gallery item
        with the query's own id is dropped and the list refilled from one
        extra neighbour, so each query must match at most one gallery id.
      leaves_to_search: override the built number of leaves probed (tree only).
      reorder: override the built number of candidates re-scored exactly.
      parallel: spread the batch over ScaNN's threads (default: when the
        batch has at least 512 queries; results are identical).

    Returns:
      ``(scores f32[Q, k], indices int32[Q, k])``, best first.
    """
    k = self.params["k"] if k is None else int(k)
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.d:
      raise ValueError(f"queries must be [Q, {self.d}], got {queries.shape}")
    want = k + (1 if exclude is not None else 0)
    parallel = parallel if parallel is not None else queries.shape[0] >= 512
    if queries.shape[0] == 0:
      idx, scores = np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    elif self.params["mode"] == "brute_force":
      idx, scores = self._search_exact(queries, k, exclude, parallel)
    else:
      kwargs = {"final_num_neighbors": min(want, self.n)}
      # The stored depth (the tuner's choice) is passed explicitly: the serialized searcher only knows the
      # depth it was built with.
      kwargs["leaves_to_search"] = int(min(max(1, leaves_to_search or self.params["num_leaves_to_search"]),
                                           self.params["num_leaves"]))
      # Re-score at least as many candidates as are returned, or the tail would be AH-approximate.
      kwargs["pre_reorder_num_neighbors"] = int(max(reorder or self.params["reorder"], kwargs["final_num_neighbors"]))
      idx, scores = self._run(queries, parallel, **kwargs)
    idx, scores = self._pad(np.asarray(idx, np.int64), np.asarray(scores, np.float32), want)
    if exclude is not None:
      idx, scores = _drop_self(idx, scores, exclude)
    return scores[:, :k], idx[:, :k].astype(np.int32)

  def _run(self, queries: np.ndarray, parallel: bool, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    if parallel:
      return self._searcher.search_batched_parallel(queries, **kwargs)
    return self._searcher.search_batched(queries, **kwargs)

  def _search_exact(self, queries: np.ndarray, k: int, exclude, parallel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Brute force with deterministic ties: (idx [Q, >= k(+1)], scores), lower gallery index first among equals.

    ScaNN returns the true top-f by score but breaks ties arbitrarily, also at the cut (which of several
    equal scores make the list). So f = k + 8 (+1 under exclusion) are fetched and each row is sorted by
    (-score, index); entries scoring strictly above the row's last fetched score are then exactly the
    reference's, in its order. A row with fewer than k such entries (a tie reaching the cut) is fetched
    again four times deeper, until it has k or the whole gallery was fetched.
    """
    rows = np.arange(queries.shape[0])
    fetch = min(self.n, k + 8 + (exclude is not None))
    out_idx = np.full((len(rows), fetch), -1, np.int64)
    out_scores = np.full((len(rows), fetch), -np.inf, np.float32)
    while len(rows):
      idx, scores = self._run(queries[rows], parallel, final_num_neighbors=fetch)
      idx, scores = np.asarray(idx, np.int64), np.asarray(scores, np.float32)
      order = np.lexsort((idx, -scores), axis=-1)
      idx, scores = np.take_along_axis(idx, order, 1), np.take_along_axis(scores, order, 1)
      sure = scores > scores[:, -1:]
      if exclude is not None:
        q_ids, g_ids = np.asarray(exclude[0])[rows], np.asarray(exclude[1])
        sure &= g_ids[idx] != q_ids[:, None]
      done = (sure.sum(1) >= k) | (fetch >= self.n)
      if out_idx.shape[1] < fetch:  # widen what was kept so far (padding sorts last)
        extra = fetch - out_idx.shape[1]
        out_idx = np.pad(out_idx, ((0, 0), (0, extra)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, extra)), constant_values=-np.inf)
      out_idx[rows[done], :fetch], out_scores[rows[done], :fetch] = idx[done], scores[done]
      rows, fetch = rows[~done], min(self.n, fetch * 4)
    return out_idx, out_scores

  def with_search_params(self, *, leaves_to_search: int | None = None, reorder: int | None = None,
                         tuned: dict[str, Any] | None = None) -> "ScannIndex":
    """The same searcher with a new default search depth (and the tuner's record); builds nothing."""
    params = dict(self.params)
    if params["mode"] != "brute_force":
      if leaves_to_search:
        params["num_leaves_to_search"] = int(min(max(1, leaves_to_search), params["num_leaves"]))
      if reorder:
        params["reorder"] = int(max(reorder, params["k"]))
    if tuned is not None:
      params["tuned"] = tuned
    elif leaves_to_search or reorder:
      params.pop("tuned", None)  # a depth of the caller's: the tuner's record no longer describes it
    return ScannIndex(self._searcher, self.n, self.d, params)

  @staticmethod
  def _pad(idx: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads results to k columns with -1 / -inf (ScaNN returns at most N)."""
    short = k - idx.shape[1]
    if short > 0:
      idx = np.pad(idx, ((0, 0), (0, short)), constant_values=-1)
      scores = np.pad(scores, ((0, 0), (0, short)), constant_values=-np.inf)
    return idx, scores

  def save(self, directory: str | os.PathLike[str]) -> None:
    """Writes ScaNN's assets plus a JSON sidecar (n, d, params) to directory (a local folder or a URL).

    Asset paths are stored relative, so the directory can be moved or copied. ScaNN serializes to
    local files only: a URL's index is written to a local temporary folder and copied up, the sidecar
    last (its presence means the copy finished), after removing any index already there.
    """
    directory = os.fspath(directory)
    if not paths.is_remote(directory):
      self._write(directory)
      return
    with tempfile.TemporaryDirectory(prefix="scann-") as local:
      self._write(local)
      if paths.isdir(directory):
        paths.rmtree(directory)
      paths.copy_tree(local, directory, last=_SIDECAR)

  def _write(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self._searcher.serialize(directory, relative_path=True)
    with open(os.path.join(directory, _SIDECAR), "w") as f:
      json.dump({"n": self.n, "d": self.d, "params": self.params}, f, indent=2)

  @classmethod
  def load(cls, directory: str | os.PathLike[str]) -> "ScannIndex":
    """Reloads an index written by `save`; a URL's is copied to a local temporary folder first (the
    loaded searcher holds its data in memory, so the copy is deleted after loading)."""
    directory = os.fspath(directory)
    if not paths.is_remote(directory):
      return cls._read(directory)
    if not paths.exists(paths.join(directory, _SIDECAR)):
      raise FileNotFoundError(f"no ScaNN index in {directory} ({_SIDECAR} missing: never written or half "
                              f"copied); rebuild it with --mode=index")
    with tempfile.TemporaryDirectory(prefix="scann-") as local:
      paths.copy_tree_down(directory, local)
      return cls._read(local)

  @classmethod
  def _read(cls, directory: str) -> "ScannIndex":
    with open(os.path.join(directory, _SIDECAR)) as f:
      meta = json.load(f)
    searcher = _scann_ops().load_searcher(directory)
    return cls(searcher, meta["n"], meta["d"], meta["params"])

