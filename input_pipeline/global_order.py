"""Which example fills each position of the endless training stream: a function of (seed, position).

The stream is a sequence of epochs; epoch e is a permutation of the split's examples drawn from
(seed, e) alone. With class weights (balanced sampling) an example of epoch e stays with its
label's acceptance probability, decided by a uniform draw from (seed, e) as well, so an epoch
keeps n_c * w_c examples of label c on average. Global batch s (0-based) holds positions
s*B .. (s+1)*B - 1. Nothing here depends on the process count or on what was read before, so

* the global batch sequence is the same for 1 or N processes (each reads a slice of it), and
* a run resumed at step s computes its next batch directly: no examples are read or replayed.

Finding the epoch of a position costs one draw per example per earlier epoch when weighted (their
sizes vary); no record is read for it.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

_CACHED_EPOCHS = 4  # a batch spans at most two epochs; a few more cover prefetching ahead


class GlobalOrder:
  """Example indices at global stream positions (`examples(start, stop)`)."""

  def __init__(self, num_examples: int, seed: int, *, labels: np.ndarray | None = None,
               class_weights: Sequence[float] | None = None):
    if num_examples <= 0:
      raise ValueError("the split has no examples to train on")
    if seed < 0:
      raise ValueError(f"config.seed={seed}: the input order needs a seed >= 0")
    self.num_examples, self.seed = num_examples, seed
    self._accept = None
    if class_weights is not None:
      if labels is None or len(labels) != num_examples:
        raise ValueError("class_weights need the label of every example")
      self._accept = np.asarray(class_weights, np.float64)[np.asarray(labels)]
    self._ends: list[int] = []  # positions before the end of epochs 0, 1, ...
    self._epochs: dict[int, np.ndarray] = {}

  def _accepted(self, epoch: int) -> np.ndarray:
    """bool[examples]: which examples epoch `epoch` keeps (its own draw, not the permutation's)."""
    return np.random.default_rng([self.seed, epoch, 1]).random(self.num_examples) < self._accept

  def epoch(self, epoch: int) -> np.ndarray:
    """int64[size of the epoch]: the examples of epoch `epoch`, in stream order."""
    if epoch not in self._epochs:
      if len(self._epochs) >= _CACHED_EPOCHS:
        del self._epochs[min(self._epochs)]
      order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      if self._accept is not None:
        order = order[self._accepted(epoch)[order]]
      self._epochs[epoch] = order
    return self._epochs[epoch]

  def _epoch_size(self, epoch: int) -> int:
    if self._accept is None:
      return self.num_examples
    if epoch in self._epochs:
      return len(self._epochs[epoch])
    return int(self._accepted(epoch).sum())

  def _epoch_start(self, epoch: int) -> int:
    return self._ends[epoch - 1] if epoch else 0

  def _cover(self, position: int) -> None:
    """Extends the known epoch ends past `position`."""
    while not self._ends or self._ends[-1] <= position:
      self._ends.append((self._ends[-1] if self._ends else 0) + self._epoch_size(len(self._ends)))

  def examples(self, start: int, stop: int) -> np.ndarray:
    """int64[stop - start]: the examples at positions start .. stop - 1 of the stream."""
    if stop <= start:
      return np.zeros(0, np.int64)
    if self._accept is None:  # every epoch has all examples: no epoch ends to track
      positions = np.arange(start, stop)
      epochs, offsets = np.divmod(positions, self.num_examples)
      return np.concatenate([self.epoch(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])
    self._cover(stop - 1)
    out, position = [], start
    while position < stop:
      e = bisect.bisect_right(self._ends, position)
      begin, end = self._epoch_start(e), self._ends[e]
      out.append(self.epoch(e)[position - begin:min(stop, end) - begin])
      position = min(stop, end)
    return np.concatenate(out).astype(np.int64)
