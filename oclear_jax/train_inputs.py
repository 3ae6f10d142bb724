"""The trainer's two input sources: records (images through the towers) and cached tower features.

Both give the loop the same things, so everything after them -- the update step, the sharded
head, checkpoints, exact resume, evaluators, logging -- is the one trainer's:

* `train_batches(start_step)`: an endless iterator of this process's share of each global batch
  (numpy, with the rows' 'id'); a function of the seed and the step only, so a run resumed from
  step k continues with exactly batch k+1; `to_device(batch)` places one on the mesh;
* `eval_set(predict, split)`: a split embedded by `predict(device_batch) -> {'query', 'doc'}`
  (`OclearTask.jit_predict` reads either kind of batch) as a `retrieval.EvalSet`;
* `frozen_eval_set(split)`: the same rows embedded by the frozen pretrained image tower's own
  pooled features, cosine, for queries and documents alike (the "frozen pretrained" row);
* `images(ids, split)`: uint8 pictures of some rows, for the contact sheet.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from oclear_jax import datasets
from oclear_jax import tower_features
from oclear_jax.evaluators import retrieval

HostBatch = dict[str, np.ndarray]


def _normalized(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class RecordsInput:
  """TFRecords written by `datasets.prepare_data`, decoded and augmented by tf.data."""

  def __init__(self, config: ml_collections.ConfigDict, prepared: datasets.PreparedData, place: Callable):
    self.config, self.prepared, self.place = config, prepared, place

  def has_split(self, split: str) -> bool:
    return bool(self.prepared.summary.get("files", {}).get(split))

  def train_batches(self, start_step: int) -> Iterator[HostBatch]:
    return datasets.train_batches(self.prepared, self.config.data, global_batch_size=self.config.train.batch_size,
                                  seed=self.config.seed, start_step=start_step)

  def to_device(self, batch: HostBatch) -> dict[str, jax.Array]:
    return datasets.to_device_batch(batch, self.place)

  def _batches(self, split: str):
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
    return pipeline.make_dataset(
        self.prepared.records_dir, split, batch_size=self.config.eval.batch_size,
        preprocess=self.config.data.eval_preprocess, shuffle=False, repeat=False,
        drop_remainder=False).as_numpy_iterator()

  def eval_set(self, predict: Callable, split: str = "eval") -> retrieval.EvalSet:
    return retrieval.embed_eval_set(self._batches(split), predict, self.place, self.config.eval.batch_size)

  def frozen_eval_set(self, pooled: Callable | None, split: str = "eval") -> retrieval.EvalSet:
    """`pooled(device_batch) -> f32[B, W]`: the pretrained image tower's pooled features."""
    def predict(batch):
      emb = _normalized(pooled(batch))
      return {"query": emb, "doc": emb}
    return self.eval_set(predict, split)

  def images(self, ids: set, split: str = "eval") -> dict[str, np.ndarray]:
    out = {}
    for batch in self._batches(split):  # a second pass fetches only the images asked for
      for i, ex_id in enumerate(batch["id"]):
        if ex_id in ids:
          out[ex_id] = np.clip((batch["image"][i] + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return out


def epoch_rows(num_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """int[batch_size]: the rows of global batch `step` (1-based) in epochs of seeded permutations.

  Batch k holds positions (k-1)B .. kB-1 of the concatenated epochs; epoch e's permutation is a
  function of (seed, e) alone, so any step's batch costs O(rows) at most, whatever k is.
  """
  positions = np.arange((step - 1) * batch_size, step * batch_size)
  epochs, offsets = np.divmod(positions, num_rows)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _permutation(num_rows, seed, int(epoch))[offsets[sel]]
  return out


@functools.lru_cache(maxsize=4)
def _permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_rows)


class TowerFeaturesInput:
  """Cached frozen-tower outputs of every catalogue row (`tower_features.load_feature_splits`)."""

  def __init__(self, config: ml_collections.ConfigDict, prepared: datasets.PreparedData, place: Callable,
               workdir: str, *, progress: bool = True):
    if config.train.batch_size % jax.process_count():
      raise ValueError(f"config.train.batch_size={config.train.batch_size} must divide over "
                       f"{jax.process_count()} processes")
    self.config, self.place = config, place
    self.splits = tower_features.load_feature_splits(config, prepared, workdir, progress=progress)
    if "train" not in self.splits:
      raise ValueError(f"data.input='tower_features': no readable training rows in {prepared.catalogue_csv}")

  def has_split(self, split: str) -> bool:
    return split in self.splits

  def train_batches(self, start_step: int) -> Iterator[HostBatch]:
    train = self.splits["train"]
    local = self.config.train.batch_size // jax.process_count()
    share = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    for step in itertools.count(start_step + 1):
      rows = epoch_rows(len(train), self.config.train.batch_size, self.config.seed, step)[share]
      yield {**train.table.device_batch(rows), "label": train.labels[rows], "kind": train.kinds[rows],
             "id": train.ids[rows]}

  def to_device(self, batch: HostBatch) -> dict[str, jax.Array]:
    return self.place({k: v for k, v in batch.items() if k != "id"})

  def _split(self, split: str) -> tower_features.FeatureSplit:
    if split not in self.splits:
      raise ValueError(f"the {split!r} split has no rows: no evaluation possible (check data.eval_fraction / the "
                       f"split column)")
    return self.splits[split]

  def eval_set(self, predict: Callable, split: str = "eval") -> retrieval.EvalSet:
    s, size = self._split(split), self.config.eval.batch_size
    query, doc = [], []
    for start in range(0, len(s), size):
      rows = np.minimum(np.arange(start, start + size), len(s) - 1)  # static shapes: pad with the last row
      out = predict(self.place({**s.table.device_batch(rows), "label": s.labels[rows], "kind": s.kinds[rows]}))
      count = min(size, len(s) - start)
      query.append(np.asarray(out["query"])[:count])
      doc.append(np.asarray(out["doc"])[:count])
    return retrieval.EvalSet(ids=s.ids, labels=s.labels, kinds=s.kinds, titles=s.titles,
                             query_emb=np.concatenate(query), doc_emb=np.concatenate(doc))

  def frozen_eval_set(self, pooled: Callable | None = None, split: str = "eval") -> retrieval.EvalSet:
    del pooled  # the cache holds the frozen tower's pooled features already
    s = self._split(split)
    emb = _normalized(s.table.image_pooled)
    return retrieval.EvalSet(ids=s.ids, labels=s.labels, kinds=s.kinds, titles=s.titles, query_emb=emb, doc_emb=emb)

  def images(self, ids: set, split: str = "eval") -> dict[str, np.ndarray]:
    from oclear_jax.weights import feature_cache  # pylint: disable=g-import-not-at-top
    s, size = self._split(split), self.config.data.stored_image_size
    return {i: np.clip((feature_cache.load_image(p, size) + 1.0) * 127.5, 0, 255).astype(np.uint8)
            for i, p in zip(s.ids.tolist(), s.image_paths.tolist()) if i in ids}


def make_input(config: ml_collections.ConfigDict, prepared: datasets.PreparedData, place: Callable, workdir: str, *,
               progress: bool = True):
  """The input source `config.data.input` names."""
  if config.data.get("input", "records") == "tower_features":
    return TowerFeaturesInput(config, prepared, place, workdir, progress=progress)
  return RecordsInput(config, prepared, place)
