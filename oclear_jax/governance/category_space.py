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
"""
from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.decomposition import TruncatedSVD

from oclear_jax.governance import featurize


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


def unit_images(vectors: np.ndarray, ok: np.ndarray, fit: np.ndarray) -> np.ndarray:
  """f64[N, D]: descriptors centred on the `fit` rows' mean and l2-normalised (zero where not ok)."""
  out = np.zeros(vectors.shape, np.float64)
  if fit.any():
    out[ok] = _l2(vectors[ok].astype(np.float64) - vectors[fit].astype(np.float64).mean(0))
  return out


def reduce_images(unit: np.ndarray, ok: np.ndarray, fit: np.ndarray, dims: int) -> np.ndarray:
  """f64[N, d]: the top-`dims` principal components of the `fit` rows, applied to the ok rows."""
  if fit.sum() < 2:
    return np.zeros((len(unit), 1), np.float64)
  mean = unit[fit].mean(0)
  x = unit[fit] - mean
  _, vectors = np.linalg.eigh(x.T @ x / len(x))
  d = max(1, min(dims, x.shape[1], len(x) - 1))
  basis = vectors[:, ::-1][:, :d]
  basis *= np.where(basis[np.abs(basis).argmax(0), np.arange(d)] < 0, -1.0, 1.0)  # A fixed sign per axis.
  out = np.zeros((len(unit), d), np.float64)
  out[ok] = (unit[ok] - mean) @ basis
  return out


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
    rows = a & trusted
    d = z.shape[1]
    if rows.sum() < 2:
      blocks.append(np.zeros_like(z))
      continue
    cats = categories[rows]
    _, dense = np.unique(cats, return_inverse=True)
    counts = np.bincount(dense)
    sums = np.zeros((len(counts), d))
    np.add.at(sums, dense, z[rows])
    residual = z[rows] - (sums / counts[:, None])[dense]
    dof = rows.sum() - len(counts)
    within = residual.T @ residual / max(dof, 1)
    if dof < 1 or np.trace(within) <= 1e-12:
      notes.append(f"block {b}: no category has two trusted members; distances use the total spread")
      centred = z[rows] - z[rows].mean(0)
      within = centred.T @ centred / max(len(centred) - 1, 1)
    scale = max(np.trace(within) / d, 1e-12)
    within = (1 - shrinkage) * within + shrinkage * scale * np.eye(d)
    values, vectors = np.linalg.eigh(within)
    transform = vectors / np.sqrt(np.maximum(values, 1e-12 * scale))
    out = np.zeros_like(z)
    out[a] = (z[a] - z[rows].mean(0)) @ transform
    blocks.append(out)
  return Space(blocks, [a.copy() for a in avail]), notes
