"""The independent reference for exact top-k tests: float64 scores, stable argsort."""
import numpy as np


def numpy_top_k(queries, gallery, k, exclude=None):
  """(scores, indices) of the k best documents per query; the lower index wins a tie; a query's
  own document (`exclude` = (query ids, gallery ids)) is never a result; -inf / -1 pad short rows."""
  scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
  if exclude is not None:
    scores[exclude[0][:, None] == exclude[1][None, :]] = -np.inf
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  top = np.take_along_axis(scores, order, axis=1)
  order = np.where(np.isneginf(top), -1, order)
  pad = k - order.shape[1]
  return (np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf),
          np.pad(order, ((0, 0), (0, pad)), constant_values=-1))
