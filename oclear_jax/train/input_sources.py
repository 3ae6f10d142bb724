"""The trainer's input sources: records (images through the towers), cached tower features, cached trunk maps.

`config.data.input` names one (`SOURCES`: the source and the `batch_formats` class that maps its
batches to the model). Every source gives the loop and the evaluators the same things, so
everything after them -- the update step, the sharded head, checkpoints, exact resume,
evaluators, logging -- is the one trainer's:

* `train_batches(start_step)`: an endless iterator of this process's share of each global batch
  (numpy, with the rows' 'id'); a function of the seed and the step only, so a run resumed from
  step k continues with exactly batch k+1; `to_device(batch)` places one on the mesh;
* `eval_set(predict, split, title_pooled=)`: a split embedded by `predict(device_batch) ->
  {'query', 'doc'}` (`OclearTask.jit_predict`) as an `evaluation.EvalSet`;
* `title_vectors(eval_set, split)`: each row's unit title vector for title feedback;
* `frozen_eval_set(task, state, shardings, fresh=)`: the same rows embedded by the frozen
  pretrained image tower's own pooled features, cosine, for queries and documents alike (the
  "frozen pretrained" row), or None;
* `has_split(split)`, and `images(ids, split)`: uint8 pictures of some rows, for the contact sheet.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from input_pipeline import images as images_lib
from input_pipeline import pipeline
from oclear_jax import run_data
from oclear_jax.distributed import host_gather
from oclear_jax.features import tower_features
from oclear_jax.features import trunk_cache
from oclear_jax.retrieval import evaluation
from oclear_jax.retrieval import title_feedback
from oclear_jax.train import batch_formats
from oclear_jax.train import pretrained_towers

HostBatch = dict[str, np.ndarray]
# What a records batch sends to the device; ids and raw titles stay on the host.
DEVICE_FEATURES = ("image", "title_tokens", "label", "kind")


def _normalized(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class RecordsInput:
  """TFRecords written by `run_data.prepare_data`, decoded and augmented by tf.data."""

  def __init__(self, config: ml_collections.ConfigDict, prepared: run_data.PreparedData, place: Callable,
               workdir: str = "", *, progress: bool = True):
    del workdir, progress  # the records are written already (run_data.prepare_data)
    self.config, self.prepared, self.place = config, prepared, place

  def has_split(self, split: str) -> bool:
    return bool(self.prepared.summary.get("files", {}).get(split))

  def train_batches(self, start_step: int) -> Iterator[HostBatch]:
    """Global batch k (0-based) is a function of (seed, k) whatever the process count, and each process
    reads only its rows of it: a run resumed from step k starts at batch k of the uninterrupted run."""
    data = self.config.data
    weights = pipeline.read_class_weights(self.prepared.records_dir, "train") if data.balanced_sampling else None
    return pipeline.make_train_dataset(
        self.prepared.records_dir, "train", global_batch_size=self.config.train.batch_size,
        preprocess=data.train_preprocess, seed=self.config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        class_weights=weights).as_numpy_iterator()

  def to_device(self, batch: HostBatch) -> dict[str, jax.Array]:
    return self.place({k: batch[k] for k in DEVICE_FEATURES})

  def _batches(self, split: str, *, share: bool = False):
    """The split's batches; `share`: this process's share only (round robin over processes, the rows
    host_gather.share_row_numbers numbers), read by index: a host reads only its rows."""
    size = self.config.eval.batch_size
    return pipeline.make_share_dataset(
        self.prepared.records_dir, split, batch_size=host_gather.local_batch_size(size) if share else size,
        preprocess=self.config.data.eval_preprocess, process_index=jax.process_index() if share else 0,
        process_count=jax.process_count() if share else 1).as_numpy_iterator()

  def eval_set(self, predict: Callable, split: str = "eval", *,
               title_pooled: Callable | None = None) -> evaluation.EvalSet:
    """`title_pooled(device_batch)`: the text tower's titles, embedded in the same pass (title feedback)."""
    if title_pooled is not None:
      predict = lambda b, embed=predict: {**embed(b), "title": title_pooled(b)}
    # Each host reads and embeds its share; every host gets the whole set (evaluation.embed_eval_set).
    return evaluation.embed_eval_set(self._batches(split, share=True), predict, self.place,
                                     self.config.eval.batch_size)

  def title_vectors(self, eval_set: evaluation.EvalSet, split: str) -> np.ndarray | None:
    """The text tower's pooled titles the predict function returned (`EvalSet.title_pooled`), centred by the
    gallery's own mean (a training-split mean would need a pass over the training records)."""
    del split
    if eval_set.title_pooled is None:  # embedded without the text tower (the frozen row)
      return None
    return title_feedback.gallery_title_vectors(eval_set.title_pooled, eval_set.kinds == evaluation.DOC)

  def frozen_eval_set(self, task, state, shardings, *, fresh: bool,
                      split: str = "eval") -> evaluation.EvalSet | None:
    """The rows embedded by the pretrained image tower's pooled features: the state's own tower while it still
    holds the pretrained weights (frozen, or a fresh run), else those weights loaded again; None if not
    pretrained."""
    model_config = self.config.model
    if not model_config.image_pretrained:
      return None
    params = state["params"]
    if not (fresh or model_config.freeze_image_tower):  # fine-tuned since: the pretrained weights again
      params = pretrained_towers.load_pretrained_into_state(state, shardings, model_config)["params"]
    pooled = task.jit_pooled(params)

    def predict(batch):
      emb = pooled(batch)
      return {"query": emb, "doc": emb}
    es = self.eval_set(predict, split)
    emb = _normalized(es.query_emb)  # on the host, once the rows are gathered
    return dataclasses.replace(es, query_emb=emb, doc_emb=emb)

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

  def __init__(self, config: ml_collections.ConfigDict, prepared: run_data.PreparedData, place: Callable,
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
      yield {**self._train_batch(step, share, rows), "id": train.ids[rows]}

  def _train_batch(self, step: int, share: slice, rows: np.ndarray) -> HostBatch:
    """This process's `share` of global batch `step`, whose rows here are `rows`."""
    del step, share
    return self._split_batch("train", rows)

  def _split_batch(self, split: str, rows: np.ndarray) -> HostBatch:
    s = self.splits[split]
    return {**s.table.device_batch(rows), "label": s.labels[rows], "kind": s.kinds[rows]}

  def to_device(self, batch: HostBatch) -> dict[str, jax.Array]:
    return self.place({k: v for k, v in batch.items() if k != "id"})

  def _split(self, split: str) -> tower_features.FeatureSplit:
    if split not in self.splits:
      raise ValueError(f"the {split!r} split has no rows: no evaluation possible (check data.eval_fraction / the "
                       f"split column)")
    return self.splits[split]

  def eval_set(self, predict: Callable, split: str = "eval", *,
               title_pooled: Callable | None = None) -> evaluation.EvalSet:
    del title_pooled  # the cache holds the frozen text tower's titles (title_vectors)
    s = self._split(split)
    inputs = tuple(self._split_batch(split, np.zeros(0, np.int64)))
    # Each process embeds its share of the rows; every process gets all of them (evaluation.embed_table).
    out = evaluation.embed_table(lambda rows: self._split_batch(split, rows), len(s), predict, self.place,
                                 self.config.eval.batch_size, inputs)
    return evaluation.EvalSet(ids=s.ids, labels=s.labels, kinds=s.kinds, titles=s.titles,
                              query_emb=out["query"], doc_emb=out["doc"])

  def title_vectors(self, eval_set: evaluation.EvalSet, split: str) -> np.ndarray:
    """The cached frozen MiniLM titles of the split's rows, centred by its gallery's mean (as a search is)."""
    rows = self.splits[split].table
    pooled = np.where(np.asarray(rows.present, bool)[:, None], rows.text_pooled, 0.0)
    return title_feedback.gallery_title_vectors(pooled, eval_set.kinds == evaluation.DOC)

  def frozen_eval_set(self, task, state, shardings, *, fresh: bool, split: str = "eval") -> evaluation.EvalSet:
    """The cached pooled features of the frozen pretrained image tower, cosine."""
    del task, state, shardings, fresh
    s = self._split(split)
    emb = _normalized(s.table.image_pooled)
    return evaluation.EvalSet(ids=s.ids, labels=s.labels, kinds=s.kinds, titles=s.titles, query_emb=emb, doc_emb=emb)

  def images(self, ids: set, split: str = "eval") -> dict[str, np.ndarray]:
    s, size = self._split(split), self.config.data.stored_image_size
    return {i: np.clip((images_lib.load_image(p, size) + 1.0) * 127.5, 0, 255).astype(np.uint8)
            for i, p in zip(s.ids.tolist(), s.image_paths.tolist()) if i in ids}


def trunk_views(seed: int, step: int, batch_size: int, num_views: int) -> np.ndarray:
  """int[batch_size]: the view each position of global batch `step` reads; a function of (seed, step) only.

  The rows of a batch are a function of (seed, step) too (`epoch_rows`), so each row's view is
  one of (seed, step, row): a resumed run reads exactly the views an uninterrupted one would.
  """
  return np.random.default_rng([seed, step, 1]).integers(num_views, size=batch_size)


class TrunkActivationsInput(TowerFeaturesInput):
  """Cached trunk maps of the image tower (`features.trunk_cache`), the top of which trains.

  `model.image_trainable_from=k`: the frozen stem and blocks 0..k-1 of EfficientNet-Lite0 ran once
  per training row for `data.trunk_views` views (view 0 = eval preprocessing, views >= 1 = seeded
  crops and flips) and once per other row (view 0). Each step reads, for each row of the
  tower_features batch order, the map of one view (`trunk_views`); the loss runs the tower's top
  (blocks k.., head conv; `EfficientNetLite0.top`) and then the heads and fusion. Titles, labels,
  kinds and the frozen pretrained row come from the tower_features cache, as in that source.
  """

  def __init__(self, config: ml_collections.ConfigDict, prepared: run_data.PreparedData, place: Callable,
               workdir: str, *, progress: bool = True):
    super().__init__(config, prepared, place, workdir, progress=progress)
    self.num_views = int(config.data.trunk_views)
    paths, counts = [], []
    for name, s in self.splits.items():
      paths += s.image_paths.tolist()
      counts += [self.num_views if name == "train" else 1] * len(s)
    self.cache = trunk_cache.trunk_activations(
        paths, counts, image_size=config.data.stored_image_size, trainable_from=config.model.image_trainable_from,
        cache_dir=config.data.feature_cache or os.path.join(workdir, "trunk_activations"),
        batch_size=min(64, config.eval.batch_size), progress=progress)
    # items[split]: int64[views, rows] rows of the cache; a row any of whose views failed is dropped (the
    # tower_features source decodes the same way, so this only differs from it if a file changed since)
    self.items = {}
    for name, s in list(self.splits.items()):
      views = self.num_views if name == "train" else 1
      items = np.stack([self.cache.rows(s.image_paths, v) for v in range(views)])
      keep = np.flatnonzero(self.cache.ok[items].all(axis=0))
      if len(keep) < len(s):
        logging.warning("trunk activations: %d of %d %s rows dropped (unreadable image)", len(s) - len(keep),
                        len(s), name)
        self.splits[name] = s = tower_features.FeatureSplit(
            table=s.table.take(keep), ids=s.ids[keep], labels=s.labels[keep], kinds=s.kinds[keep],
            titles=s.titles[keep], image_paths=s.image_paths[keep])
        items = items[:, keep]
      if not len(keep):
        del self.splits[name]
        continue
      self.items[name] = items
    if "train" not in self.splits:
      raise ValueError(f"data.input='trunk_activations': no readable training rows in {prepared.catalogue_csv}")

  def _split_batch(self, split: str, rows: np.ndarray, views: np.ndarray | int = 0) -> HostBatch:
    """Rows of `split` with the trunk map of view `views` (the eval preprocessing by default)."""
    s = self.splits[split]
    titles = {k: v for k, v in s.table.device_batch(rows).items() if not k.startswith("image_")}
    trunk = self.cache.activations[self.items[split][views, rows]]
    return {**titles, "trunk": trunk, "label": s.labels[rows], "kind": s.kinds[rows]}

  def _train_batch(self, step: int, share: slice, rows: np.ndarray) -> HostBatch:
    views = trunk_views(self.config.seed, step, self.config.train.batch_size, self.num_views)[share]
    return self._split_batch("train", rows, views)


# `config.data.input` -> (the source of its batches, the format that maps one to the model).
SOURCES = {
    "records": (RecordsInput, batch_formats.RecordsFormat),
    "tower_features": (TowerFeaturesInput, batch_formats.FeaturesFormat),
    "trunk_activations": (TrunkActivationsInput, batch_formats.TrunkFormat),
}


def make_input(config: ml_collections.ConfigDict, prepared: run_data.PreparedData, place: Callable, workdir: str, *,
               progress: bool = True):
  """The input source `config.data.input` names."""
  return SOURCES[config.data.input][0](config, prepared, place, workdir, progress=progress)


def batch_format(config: ml_collections.ConfigDict, model) -> batch_formats.RecordsFormat:
  """How the batches of `config.data.input` reach `model`."""
  return SOURCES[config.data.input][1](config, model)
