"""The space where governance measures distances: reduced, then whitened by within-category spread.

Raw cosine thresholds do not carry over between feature extractors or catalogues: a pixel
descriptor, an ImageNet ConvNet and TF-IDF titles spread a category very differently, and broad
categories ("T-shirts") spread far more than narrow ones (one product). So each modality is
  1. centred and l2-normalised (cosine geometry), then reduced to `pca_dims` (PCA for images,
     truncated SVD for sparse titles);
  2. whitened by the pooled within-category covariance, shrunk towards its mean variance
     (`shrinkage`): after this a category's members scatter with unit variance in every direction,
     so a squared distance divided by the dimension is ~1 for a typical member (Mahalanobis
     distance, as in linear discriminant analysis).
Governance re-fits the whitening each round on the items it currently trusts (inliers of the
current categories), so that wrong labels do not inflate the spread they are measured against.

Items are read `_CHUNK_ROWS` rows at a time and written into their output in place, so no step
makes an [N, D] temporary: touching fresh pages costs more than the arithmetic on them, and every
temporary adds to the driver's peak memory.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse
from sklearn.decomposition import TruncatedSVD

from oclear_jax.governance import featurize

_CHUNK_ROWS = 8192


@dataclasses.dataclass
class Space:
  """Items block by block (image, title): f64[N, d_b] rows, and which items have each block."""
  blocks: list[np.ndarray]
  avail: list[np.ndarray]

  @property
  def num_items(self) -> int:
    return len(self.avail[0])

  def take(self, rows: np.ndarray) -> "Space":
    return Space([b[rows] for b in self.blocks], [a[rows] for a in self.avail])


def _l2(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _chunks(rows: np.ndarray):
  for start in range(0, len(rows), _CHUNK_ROWS):
    yield rows[start:start + _CHUNK_ROWS]


def group_sums(x: np.ndarray, rows: np.ndarray, ids: np.ndarray, num_groups: int) -> np.ndarray:
  """f64[num_groups, d]: the sum of x[rows[k]] over k with ids[k] == g, added in row order (as np.add.at
  would, without its slow path or a copy of x[rows])."""
  rows = np.asarray(rows, np.int64)
  matrix = scipy.sparse.csr_matrix((np.ones(len(rows)), (np.asarray(ids, np.int64), rows)),
                                   shape=(num_groups, len(x)))
  return np.asarray(matrix @ x, np.float64).reshape(num_groups, *x.shape[1:])


def _mean(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
  total = np.zeros(x.shape[1])
  for chunk in _chunks(rows):
    total += x[chunk].sum(0, dtype=np.float64)
  return total / max(len(rows), 1)


def _scatter(x: np.ndarray, rows: np.ndarray, centre: np.ndarray, which: np.ndarray | None = None) -> np.ndarray:
  """f64[d, d]: the sum over `rows` of (x - c)^T (x - c), where c is `centre` (f64[d]), or with `which`
  (i64[len(rows)]) row which[k] of `centre` (f64[G, d]) for rows[k]."""
  total = np.zeros((x.shape[1], x.shape[1]))
  for start in range(0, len(rows), _CHUNK_ROWS):
    r = x[rows[start:start + _CHUNK_ROWS]] - (centre if which is None else centre[which[start:start + _CHUNK_ROWS]])
    total += r.T @ r
  return total


def _project(x: np.ndarray, rows: np.ndarray, centre: np.ndarray, transform: np.ndarray) -> np.ndarray:
  """f64[N, d']: (x - centre) @ transform on `rows`, zeros elsewhere."""
  out = np.zeros((len(x), transform.shape[1]), np.float64)
  transform = np.ascontiguousarray(transform)  # a strided operand leaves BLAS for numpy's slow loop
  for chunk in _chunks(rows):
    out[chunk] = (x[chunk] - centre) @ transform
  return out


@dataclasses.dataclass
class UnitImages:
  """Descriptors centred on a mean and l2-normalised, made on demand from the f32 descriptors: `unit[rows]`
  gives f64 rows (zero where not ok) identical to a stored f64 [N, D] copy, which would be twice their size."""
  vectors: np.ndarray  # f32[N, D]
  ok: np.ndarray  # bool[N]
  mean: np.ndarray  # f64[D]

  def __len__(self) -> int:
    return len(self.vectors)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.vectors.shape

  def __getitem__(self, rows) -> np.ndarray:
    return np.where(self.ok[rows][..., None], unit_rows(self.vectors[rows], self.mean), 0.0)


def unit_rows(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray:
  """f64[n, D]: f32 descriptor rows centred on `mean` and l2-normalised, each row alone (the same bits
  whichever rows are made together)."""
  return _l2(vectors.astype(np.float64) - mean)


def unit_images(vectors: np.ndarray, ok: np.ndarray, fit: np.ndarray) -> UnitImages:
  """The descriptors centred on the `fit` rows' mean and l2-normalised (zero where not ok)."""
  mean = _mean(vectors, np.flatnonzero(fit)) if fit.any() else np.zeros(vectors.shape[1])
  return UnitImages(vectors, ok & fit.any(), mean)


def reduce_images(unit: UnitImages, ok: np.ndarray, fit: np.ndarray, dims: int) -> np.ndarray:
  """f64[N, d]: the top-`dims` principal components of the `fit` rows, applied to the ok rows."""
  fit_rows = np.flatnonzero(fit)
  if len(fit_rows) < 2:
    return np.zeros((len(unit), 1), np.float64)
  mean = _mean(unit, fit_rows)
  _, vectors = np.linalg.eigh(_scatter(unit, fit_rows, mean) / len(fit_rows))
  d = max(1, min(dims, unit.shape[1], len(fit_rows) - 1))
  basis = vectors[:, ::-1][:, :d]
  basis *= np.where(basis[np.abs(basis).argmax(0), np.arange(d)] < 0, -1.0, 1.0)  # A fixed sign per axis.
  return _project(unit, np.flatnonzero(ok), mean, basis)


def reduce_titles(titles: featurize.TitleFeatures, fit: np.ndarray, dims: int) -> np.ndarray:
  """f64[N, d]: truncated SVD (LSA) fitted on the `fit` rows with a title, applied to all with one."""
  present = titles.present
  fit = fit & present
  if fit.sum() < 2:
    return np.zeros((len(present), 1), np.float64)
  out_rows = np.flatnonzero(present)
  if titles.vectors.shape[1] <= dims or fit.sum() <= dims:
    dense = titles.vectors[out_rows].toarray().astype(np.float64)
  else:
    svd = TruncatedSVD(n_components=dims, algorithm="randomized", n_iter=7, random_state=0)
    svd.fit(titles.vectors[np.flatnonzero(fit)])
    dense = svd.transform(titles.vectors[out_rows]).astype(np.float64)
  out = np.zeros((len(present), dense.shape[1]), np.float64)
  out[out_rows] = dense
  return out


def whiten(reduced: list[np.ndarray], avail: list[np.ndarray], categories: np.ndarray, trusted: np.ndarray,
           shrinkage: float) -> tuple[Space, list[str]]:
  """Whitens each block by the within-category covariance of the `trusted` items of `categories`.

  Returns the space and notes for the report (a block without two trusted members in any category
  falls back to its total covariance: its distances are then in units of the catalogue's spread).
  """
  blocks, notes = [], []
  for b, (z, a) in enumerate(zip(reduced, avail)):
    rows = np.flatnonzero(a & trusted)
    d = z.shape[1]
    if len(rows) < 2:
      blocks.append(np.zeros_like(z))
      continue
    _, dense = np.unique(categories[rows], return_inverse=True)
    counts = np.bincount(dense)
    means = group_sums(z, rows, dense, len(counts)) / counts[:, None]
    dof = len(rows) - len(counts)
    within = _scatter(z, rows, means, dense) / max(dof, 1)
    centre = _mean(z, rows)
    if dof < 1 or np.trace(within) <= 1e-12:
      notes.append(f"block {b}: no category has two trusted members; distances use the total spread")
      within = _scatter(z, rows, centre) / max(len(rows) - 1, 1)
    scale = max(np.trace(within) / d, 1e-12)
    within = (1 - shrinkage) * within + shrinkage * scale * np.eye(d)
    values, vectors = np.linalg.eigh(within)
    transform = vectors / np.sqrt(np.maximum(values, 1e-12 * scale))
    blocks.append(_project(z, np.flatnonzero(a), centre, transform))
  return Space(blocks, [a.copy() for a in avail]), notes
