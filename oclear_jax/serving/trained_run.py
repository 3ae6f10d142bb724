"""A trained run as an embedding model: its config, its records' tokenizer, its parameters.

What index, search, embed and the evaluators use, so that nothing downstream of training
imports the trainer. Only the model's parameters (`params/encoder` of the checkpoint) are
read: the class centres and the optimizer state are never touched. They are what a
10^8-class run's checkpoint is made of (hundreds of GB), and nothing needs them to embed;
it also means a checkpoint trained on N classes embeds a catalogue with other labels, or none.

  config = run_config.load(workdir)            # the config in force (config.json + config_history.jsonl)
  trained = restore_trained_model(config, workdir)
  embed = trained.embedder("query_and_doc")    # host batch -> f32[n, 2, d]

Images become model inputs exactly as on the run's eval path (`input_pipeline.images.preprocess_image_files`): for a
run on records, re-encoded like the records (`input_pipeline.records.encode_image`: RGB, shrunk
to `data.stored_image_size`, JPEG), then `data.eval_preprocess` through the registered
preprocessing ops; for a run on cached tower outputs, through the caches' loader.
Titles go through the tokenizer saved beside the run's records, padded to `data.max_title_len`.

With N processes (a pod, or `oclear_jax.distributed.launch`) every process restores the model on the mesh
over all devices, and embedding is a collective: `embedder` takes the same batch on every
process, `mesh_embedder` each process's own share (`distributed.host_gather`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import paths
from input_pipeline import records as records_lib
from input_pipeline import tokenizer as tokenizer_lib
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import run_data
from oclear_jax import sharding
from oclear_jax.distributed import host_gather
from oclear_jax import models
from oclear_jax.models import build_model
from oclear_jax.serving import composition as composition_lib
from oclear_jax.serving import export

# Embedder heads: a query is a shopper photo through the query head; a document is the catalogue
# image plus its title through the fusion and the document head; both come from one tower pass.
HEADS = {"query": ("image",), "doc": ("image", "title_tokens"), "query_and_doc": ("image", "title_tokens"),
         # {query, doc, pooled (the image tower's own features), title (the text tower's)}: --mode=evaluate
         "views_and_towers": ("image", "title_tokens"),
         "title": ("title_tokens",)}  # the text tower's pooled titles, zero rows for untitled: title feedback


# == The run's config and records ==================================================================
def run_records(config: ml_collections.ConfigDict, workdir: str) -> run_data.PreparedData:
  """The records the run trained on, as they are (never re-prepared: the model was trained on them)."""
  csv_path, records_dir = run_data.catalogue_paths(config.data, workdir)
  summary_path = paths.join(records_dir, "records.json")
  if not paths.exists(summary_path):
    raise FileNotFoundError(f"{summary_path} not found: {workdir} holds no records of a trained run; train first "
                            f"(python -m oclear_jax.main --config=... --workdir={workdir})")
  with paths.open(summary_path) as f:
    return run_data.PreparedData(records_dir=records_dir, catalogue_csv=csv_path, summary=json.load(f))


# == Restore: params/encoder only (checkpoint.restore_model_params) ================================
def abstract_model_params(model: nn.Module, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                          rules: sharding.Rules) -> tuple[Any, Any]:
  """(abstract params, their NamedShardings) of the model, as the trainer lays them out."""
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(_init_params(model, config), jax.random.key(0))
    shardings = sharding.tree_shardings(boxed, mesh, rules)
  return nn.meta.unbox(boxed), shardings


def _init_params(model: nn.Module, config: ml_collections.ConfigDict) -> Callable[[jax.Array], Any]:
  """rng -> the model's boxed params, initialised on dummy inputs of the config's shapes."""
  size, length = config.data.stored_image_size, config.data.max_title_len
  dummy_image = jnp.zeros((2, size, size, 3), jnp.float32)
  dummy_tokens = jnp.zeros((2, length), jnp.int32)
  return lambda rng: model.init({"params": rng, "dropout": rng}, dummy_image, dummy_tokens,
                                jnp.zeros((2,), bool), train=False)["params"]


@dataclasses.dataclass
class TrainedModel:
  """A run's model and parameters on this host's mesh, with embed functions for host batches."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  model: nn.Module
  params: Any  # the encoder's params (what the checkpoint holds under params/encoder)
  step: int  # -1: no checkpoint (the pretrained towers, `initial_model`)
  records: run_data.PreparedData | None  # None: no run (then `tokenizer` is given)
  tokenizer: tokenizer_lib.TitleTokenizer | None = None
  # How the run's parts are weighed where it is served (an index's choice, `serving.composition`); None: as trained.
  composition: composition_lib.Composition | None = None
  _predict_fns: dict[str, Callable] = dataclasses.field(default_factory=dict, repr=False)

  @functools.cached_property
  def title_tokenizer(self):
    """The tokenizer that made the run's title_tokens (saved beside its records), or the one given."""
    if self.tokenizer is not None:
      return self.tokenizer
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
    key = (head, self.composition)
    if key not in self._predict_fns:
      self._predict_fns[key] = self._make_predict(head)
    return self._predict_fns[key]

  def _make_predict(self, head: str):

    composition = self.composition if head in ("query", "doc", "query_and_doc") else None
    m = self.config.model
    shape = dict(embed_dim=m.embed_dim, title_match_dim=m.title_match_dim, title_match_weight=m.title_match_weight)

    def predict(params, batch):
      variables = {"params": params}
      if composition is not None:  # both sides from one pass, weighed as the index chose
        tokens = batch.get("title_tokens")
        if tokens is None:  # a query: no title
          tokens = jnp.zeros((batch["image"].shape[0], self.config.data.max_title_len), jnp.int32)
        views = self.model.apply(variables, batch["image"], tokens, method="views_and_towers")
        queries, documents = composition_lib.vectors(views, composition, **shape)
        both = {"query": queries, "doc": documents, "query_and_doc": jnp.stack([queries, documents], axis=1)}
        return {head: both[head]}
      if head == "query":
        return {head: self.model.apply(variables, batch["image"], method="embed_queries")}
      if head == "doc":
        return {head: self.model.apply(variables, batch["image"], batch["title_tokens"], method="embed_documents")}
      if head == "title":
        _, pooled, _ = self.model.apply(variables, batch["title_tokens"], method=lambda m, t: m.text_encoder(t))
        present = models.title_present(batch["title_tokens"], self.model.title_special_ids)
        return {head: jnp.where(present[:, None], pooled, 0.0)}
      if head == "views_and_towers":
        return self.model.apply(variables, batch["image"], batch["title_tokens"], method="views_and_towers")
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
    return export.device_embedder(self.jit_predict(head), self.params, self.place,
                                  batch_size or self.config.eval.batch_size, head, inputs=HEADS[head])

  def mesh_embedder(self, head: str, batch_size: int | None = None):
    """A `host_gather.MeshEmbedder` of `head` for rows each process holds its own share of
    (`step(local_batch)` per global batch; `batch_size` default config.eval.batch_size)."""
    predict = self.jit_predict(head)
    return host_gather.MeshEmbedder(lambda batch: predict(self.params, batch), self.place,
                                    batch_size or self.config.eval.batch_size, HEADS[head],
                                    outputs=None if head == "views_and_towers" else (head,))


def restore_trained_model(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, *,
                          records: run_data.PreparedData | None = None) -> TrainedModel:
  """The run in `workdir` at checkpoint `step`, built from `config` on its mesh.

  Default step: the checkpoint the run selected on its validation split (checkpoints_best/, see
  `train/evaluators/checkpoint_selection.py`) when it kept one, else the latest.

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
  params, step = checkpoint_lib.restore_model_params(best_dir if use_best else paths.join(workdir, "checkpoints"),
                                                     checkpoint_lib.abstract_with_shardings(abstract, shardings), step)
  return TrainedModel(config=config, mesh=mesh, rules=rules, model=model, params=params, step=step,
                      records=records)


def initial_model(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.TitleTokenizer) -> TrainedModel:
  """The model of `config` as initialised (seed config.seed), no run behind it: load the pretrained towers into
  its params (`train.pretrained_towers`) for the frozen towers' row. Titles go through `tokenizer`."""
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = sharding.logical_rules(config.sharding.rules)
  model = build_model(config.model, vocab_size=tokenizer.vocab_size, max_title_len=config.data.max_title_len,
                      title_special_ids=tokenizer.special_ids)
  _, shardings = abstract_model_params(model, config, mesh, rules)
  init = _init_params(model, config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)(jax.random.key(config.seed))
  return TrainedModel(config=config, mesh=mesh, rules=rules, model=model, params=params, step=-1, records=None,
                      tokenizer=tokenizer)
