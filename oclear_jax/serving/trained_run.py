"""A trained run as an embedding model: its config, its records' tokenizer, its parameters.

What index, search, embed and the evaluators use, so that nothing downstream of training
imports the trainer. Only the model's parameters (`params/encoder` of the checkpoint) are
read: the class centres and the optimizer state are never touched. They are what a
10^8-class run's checkpoint is made of (hundreds of GB), and nothing needs them to embed;
it also means a checkpoint trained on N classes embeds a catalogue with other labels, or none.

  config = load_run_config(workdir)            # what the run saved (config.json)
  trained = restore_trained_model(config, workdir)
  embed = trained.embedder("query_and_doc")    # host batch -> f32[n, 2, d]

Images become model inputs exactly as on the run's eval path (`preprocess_image_files`): for a
run on records, re-encoded like the records (`input_pipeline.records.encode_image`: RGB, shrunk
to `data.stored_image_size`, JPEG), then `data.eval_preprocess` through the registered
preprocessing ops; for a run on cached tower outputs, through the caches' loader.
Titles go through the tokenizer saved beside the run's records, padded to `data.max_title_len`.

With N processes (a pod, or `oclear_jax.distributed.launch`) every process restores the model on the mesh
over all devices, and embedding is a collective: `embedder` takes the same batch on every
process, `mesh_embedder` each process's own share (`distributed.host_gather`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import config_schema
from oclear_jax import run_data
from input_pipeline import paths
from oclear_jax import sharding
from oclear_jax.models import build_model

# Embedder heads: a query is a shopper photo through the query head; a document is the catalogue
# image plus its title through the fusion and the document head; both come from one tower pass.
HEADS = {"query": ("image",), "doc": ("image", "title_tokens"), "query_and_doc": ("image", "title_tokens")}


# == The run's config and records ==================================================================
def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir` (config.json), on top of today's defaults; locked."""
  path = paths.join(workdir, "config.json")
  if not paths.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} holds no training run; train first "
                            f"(--mode=train) or pass --config=configs/...py")
  try:
    with paths.open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); pass --config=configs/...py instead") from e
  config = config_schema.base_config()
  _merge(config, saved, path, "")
  config_schema.validate(config)
  config.lock()
  return config


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _merge(node: ml_collections.ConfigDict, saved: dict, path: str, prefix: str) -> None:
  for key, value in saved.items():
    if key not in node:
      raise ValueError(f"{path}: unknown config key {prefix}{key} (saved by another version of oclear_jax?); "
                       f"pass --config=configs/...py with the run's settings instead")
    if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(node[key], value, path, f"{prefix}{key}.")
    else:
      node[key] = _as_tuples(value)  # JSON has lists where the config has tuples


def run_records(config: ml_collections.ConfigDict, workdir: str) -> run_data.PreparedData:
  """The records the run trained on, as they are (never re-prepared: the model was trained on them)."""
  csv_path, records_dir = run_data.catalogue_paths(config.data, workdir)
  summary_path = paths.join(records_dir, "records.json")
  if not paths.exists(summary_path):
    raise FileNotFoundError(f"{summary_path} not found: {workdir} holds no records of a trained run; train first "
                            f"(python -m oclear_jax.main --config=... --workdir={workdir})")
  with paths.open(summary_path) as f:
    return run_data.PreparedData(records_dir=records_dir, catalogue_csv=csv_path, summary=json.load(f))


# == Restore: params/encoder only ===================================================================
def abstract_model_params(model: nn.Module, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                          rules: sharding.Rules) -> tuple[Any, Any]:
  """(abstract params, their NamedShardings) of the model, as the trainer lays them out."""
  size, length = config.data.stored_image_size, config.data.max_title_len
  dummy_image = jnp.zeros((2, size, size, 3), jnp.float32)
  dummy_tokens = jnp.zeros((2, length), jnp.int32)
  init = lambda rng: model.init({"params": rng, "dropout": rng}, dummy_image, dummy_tokens,
                                jnp.zeros((2,), bool), train=False)["params"]
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.tree_shardings(boxed, mesh, rules)
  return nn.meta.unbox(boxed), shardings


def _checkpoint_manager(directory: str) -> ocp.CheckpointManager:
  # A reader: a training run may be writing next to us, so create, clean up and delete nothing
  # (orbax's read_only=True does the same but logs two warnings per restore).
  # Absolute: orbax refuses a relative path, and a library caller may pass `workdirs/run`.
  return ocp.CheckpointManager(checkpoint_lib.orbax_directory(directory), item_handlers=ocp.PyTreeCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False))


def restore_encoder_params(checkpoints_dir: str, target: Any, step: int | None = None) -> tuple[Any, int]:
  """(`params/encoder` of checkpoint `step` (default latest) onto `target`'s shardings, step).

  A partial restore: the checkpoint's other arrays (class centres, optimizer moments, step) are
  neither read nor allocated. `target` is a tree of `jax.ShapeDtypeStruct` with shardings.
  """
  if not paths.isdir(checkpoint_lib.orbax_directory(checkpoints_dir)):
    raise FileNotFoundError(f"no checkpoint in {checkpoints_dir}; train first (--mode=train)")
  manager = _checkpoint_manager(checkpoints_dir)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpoints_dir}; train first (--mode=train)")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint step {step} in {checkpoints_dir} (steps there: {sorted(steps)})")
    saved = manager.item_metadata(step).tree
    saved_encoder = saved.get("params", {}).get("encoder", {}) if isinstance(saved, dict) else {}
    problem = checkpoint_lib.shape_mismatch(saved_encoder, target)
    if problem:
      raise checkpoint_lib.IncompatibleCheckpointError(
          f"checkpoint {checkpoints_dir}/{step} holds another model's parameters: {problem}. Pass the run's "
          f"own config (omit --config to use {os.path.dirname(checkpoints_dir)}/config.json)")
    item = {"params": {"encoder": target}}
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  finally:
    manager.close()
  return restored["params"]["encoder"], int(step)


@dataclasses.dataclass
class TrainedModel:
  """A run's model and parameters on this host's mesh, with embed functions for host batches."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  model: nn.Module
  params: Any  # the encoder's params (what the checkpoint holds under params/encoder)
  step: int
  records: run_data.PreparedData
  _predict_fns: dict[str, Callable] = dataclasses.field(default_factory=dict, repr=False)

  @functools.cached_property
  def title_tokenizer(self):
    """The tokenizer that made the run's title_tokens (saved beside its records)."""
    from input_pipeline import records as records_lib  # pylint: disable=g-import-not-at-top
    from input_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    path = paths.join(self.records.records_dir, records_lib.TOKENIZER_FILE)
    if not paths.exists(path):
      raise FileNotFoundError(f"{path} not found: the run's records lack their tokenizer; rerun --mode=prepare "
                              f"with the run's config")
    return tokenizer_lib.TitleTokenizer.load(path)

  def tokenize(self, titles: Sequence[str]) -> np.ndarray:
    """int32[n, max_title_len], exactly as the records hold titles ('' -> [CLS] [SEP], no title)."""
    return self.title_tokenizer.encode_batch(list(titles), self.config.data.max_title_len)

  def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return sharding.global_batch(batch, self.mesh, self.rules)

  def jit_predict(self, head: str) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
    """`predict(params, device_batch) -> {head: f32[B, d]}` ('query_and_doc': f32[B, 2, d]), jitted once."""
    if head not in HEADS:
      raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}")
    if head not in self._predict_fns:
      self._predict_fns[head] = self._make_predict(head)
    return self._predict_fns[head]

  def _make_predict(self, head: str):

    def predict(params, batch):
      variables = {"params": params}
      if head == "query":
        return {head: self.model.apply(variables, batch["image"], method="embed_queries")}
      if head == "doc":
        return {head: self.model.apply(variables, batch["image"], batch["title_tokens"], method="embed_documents")}
      queries, documents = self.model.apply(variables, batch["image"], batch["title_tokens"], method="both_views")
      return {head: jnp.stack([queries, documents], axis=1)}
    predict = jax.jit(predict)

    def run(params, batch):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return predict(params, batch)
    return run

  def embedder(self, head: str, batch_size: int | None = None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """`embed(host_batch) -> np.ndarray` for up to `batch_size` rows (default config.eval.batch_size):
    padded to the fixed batch (one compilation), placed on the mesh, padding cut off. On N
    processes a collective: every process passes the same batch and embeds its share of it."""
    from oclear_jax.serving import export  # pylint: disable=g-import-not-at-top  (evaluators import inference)
    return export.device_embedder(self.jit_predict(head), self.params, self.place,
                                  batch_size or self.config.eval.batch_size, head, inputs=HEADS[head])

  def mesh_embedder(self, head: str, batch_size: int | None = None):
    """A `host_gather.MeshEmbedder` of `head` for rows each process holds its own share of
    (`step(local_batch)` per global batch; `batch_size` default config.eval.batch_size)."""
    from oclear_jax.distributed import host_gather  # pylint: disable=g-import-not-at-top
    predict = self.jit_predict(head)
    return host_gather.MeshEmbedder(lambda batch: predict(self.params, batch), self.place,
                                    batch_size or self.config.eval.batch_size, HEADS[head], outputs=(head,))


def restore_trained_model(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, *,
                          records: run_data.PreparedData | None = None) -> TrainedModel:
  """The run in `workdir` at checkpoint `step`, built from `config` on its mesh.

  Default step: the checkpoint the run selected on its validation split (checkpoints_best/, see
  `train/evals.CheckpointSelection`) when it kept one, else the latest.

  The vocabulary size and title special ids come from the run's records (`run_records`), never
  from re-preparing data: the model was trained on those records.
  """
  records = records or run_records(config, workdir)
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = sharding.logical_rules(config.sharding.rules)
  model = build_model(config.model, vocab_size=records.vocab_size, max_title_len=config.data.max_title_len,
                      title_special_ids=records.title_special_ids)
  abstract, shardings = abstract_model_params(model, config, mesh, rules)
  best_dir = checkpoint_lib.best_checkpoint_dir(workdir)
  best_orbax = checkpoint_lib.orbax_directory(best_dir)
  use_best = step is None and paths.isdir(best_orbax) and paths.listdir(best_orbax)
  params, step = restore_encoder_params(best_dir if use_best else paths.join(workdir, "checkpoints"),
                                        checkpoint_lib.abstract_with_shardings(abstract, shardings), step)
  return TrainedModel(config=config, mesh=mesh, rules=rules, model=model, params=params, step=step,
                      records=records)


# == Images as the eval path sees them ==============================================================
def preprocess_image_files(paths: Sequence[str], config: ml_collections.ConfigDict, *,
                           first_index: int = 0) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
  """(inputs f32[k, H, W, 3] of the readable files, their positions in `paths`, [(position, reason)]
  of the unreadable ones). Never raises on a bad file.

  Each file is re-encoded like the records (`records.encode_image`, in threads: PIL releases the
  GIL) and then run through `data.eval_preprocess`; `first_index + position` is the example index
  of the op seed, as the eval pipeline's enumerate gives it (eval ops are deterministic anyway).
  A run trained on cached tower outputs (`data.input` tower_features / trunk_activations) saw its
  images through the caches' loader (`feature_cache.load_image`), so its files are loaded that way:
  what is served is what was trained and evaluated (the two loaders differ by a JPEG re-encode and a
  second resampling, cosine ~0.98 between their Lite0 features).
  """
  if config.data.get("input", "records") != "records":
    return _cached_input_images(paths, config.data.stored_image_size)
  from input_pipeline import preprocess_ops  # pylint: disable=g-import-not-at-top  (imports TF)
  from input_pipeline import records as records_lib  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  size = config.data.stored_image_size or None
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    encoded = list(pool.map(lambda p: records_lib.encode_image(p, size), paths))
  kept = [i for i, (jpeg, _) in enumerate(encoded) if jpeg is not None]
  failed = [(i, reason) for i, (jpeg, reason) in enumerate(encoded) if jpeg is None]
  if not kept:
    return np.zeros((0,), np.float32), kept, failed
  preprocess = preprocess_ops.get_preprocess_fn(config.data.eval_preprocess)

  def as_input(jpeg, index):
    features = preprocess({"image": jpeg, "seed": tf.stack([tf.constant(0, tf.int64), index])})
    return tf.cast(features["image"], tf.float32)

  ds = tf.data.Dataset.from_tensor_slices((tf.constant([encoded[i][0] for i in kept]),
                                           tf.constant([first_index + i for i in kept], tf.int64)))
  images = ds.map(as_input).batch(len(kept)).get_single_element()
  return np.asarray(images), kept, failed


def _cached_input_images(paths: Sequence[str], size: int) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
  from oclear_jax.features import feature_cache  # pylint: disable=g-import-not-at-top
  images, kept, failed = [], [], []
  for i, path in enumerate(paths):
    try:
      images.append(feature_cache.load_image(path, size))
      kept.append(i)
    except ValueError:
      from input_pipeline import records as records_lib  # pylint: disable=g-import-not-at-top
      failed.append((i, records_lib.encode_image(path, size)[1] or "unreadable"))  # the records' reason words
  return (np.stack(images) if images else np.zeros((0,), np.float32)), kept, failed
