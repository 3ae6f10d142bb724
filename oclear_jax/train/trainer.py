"""The one config-driven training loop, in sections like big_vision's train.py.

mesh -> data -> model init (eval_shape + jit out_shardings) -> restore -> update step ->
evaluators -> loop. The backbone is replicated (or FSDP by rule) and data-parallel; the class
centres are split by class over the mesh; the margin softmax never gathers full logits.

Two input sources feed the same loop (`train/input_sources`, `config.data.input`): records (images
through the towers) or, with frozen pretrained towers, their cached outputs (`tower_features`).
The state is the same model either way -- towers included, so a checkpoint of a run trained on
cached features embeds raw images end to end -- only the loss reads another kind of batch.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import config_schema
from oclear_jax import run_config
from oclear_jax import run_data
from oclear_jax.distributed import workdir_lock
from oclear_jax.train import metric_writers
from oclear_jax.train import optimizer
from input_pipeline import paths
from oclear_jax.train import pretrained_towers
from oclear_jax import sharding
from oclear_jax.train.evaluators import registry
from oclear_jax.train import input_sources
from oclear_jax.heads import info_nce
from oclear_jax.heads import margins
from oclear_jax.heads import class_shards
from oclear_jax.heads import sharded_softmax
from oclear_jax.heads import title_match_loss
from oclear_jax.models import build_model
from oclear_jax.models import title_match as title_match_lib


class OclearTask:
  """Model + class centres + optimizer for one config: builds states and the jitted steps."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, num_classes: int,
               vocab_size: int, title_special_ids: tuple[int, ...] | None = None):
    self.config = config
    self.mesh = mesh
    self.model = build_model(config.model, vocab_size=vocab_size, max_title_len=config.data.max_title_len,
                             title_special_ids=title_special_ids)  # the records' tokenizer's [CLS], [SEP]
    # model.image_trainable_from=k: no backward pass through the frozen image trunk (blocks < k).
    self.model = pretrained_towers.with_trainable_from(self.model, config.model)
    self.batch_format = input_sources.batch_format(config, self.model)  # how this run's batches reach the model
    # Frozen towers (config.model.freeze_*) and the image trunk before model.image_trainable_from get zero
    # updates: no Adam step, no weight decay, no moments; optimizer.pretrained_lr_scale slows pretrained layers.
    self.tx = optimizer.train_optimizer(config)
    self.rules = sharding.logical_rules(config.sharding.rules)
    self.num_classes = num_classes
    self.batch_axes = sharding.mesh_axes("batch", self.rules)
    self.class_axes = sharding.mesh_axes("classes", self.rules)
    self.padded_classes = class_shards.pad_num_classes(
        num_classes, sharding.num_shards(mesh, self.class_axes), chunk_size=config.head.chunk_size or None)
    self.margin_fn = margins.from_config(config.head)
    size = config.data.stored_image_size
    self._dummy = dict(
        image=jnp.zeros((2, size, size, 3), jnp.float32),
        title_tokens=jnp.zeros((2, config.data.max_title_len), jnp.int32),
        kind=jnp.zeros((2,), jnp.int32))

  # == Init: shapes from eval_shape, parameters created already sharded ===========================
  def _init_boxed(self, rng: jax.Array) -> dict[str, Any]:
    model_rng, centers_rng = jax.random.split(rng)
    variables = self.model.init(
        {"params": model_rng, "dropout": model_rng}, self._dummy["image"], self._dummy["title_tokens"],
        self._dummy["kind"] == 1, train=False)
    params = {"encoder": variables["params"]}
    if self.config.head.loss == "info_nce":  # no class centres: a learned log(1 / temperature) instead
      params["logit_scale_log"] = jnp.asarray(np.log(1.0 / self.config.head.temperature), jnp.float32)
    else:
      centers_init = nn.with_logical_partitioning(nn.initializers.normal(0.01), ("classes", "embed"))
      centers_shape = (self.padded_classes, self.config.model.embed_dim)
      params["class_centers"] = centers_init(centers_rng, centers_shape, jnp.dtype(self.config.head.param_dtype))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

  def abstract_state(self):
    """(abstract unboxed state, its NamedShardings)."""
    with nn.logical_axis_rules(self.rules):
      boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
      shardings = sharding.tree_shardings(boxed, self.mesh, self.rules)
    return nn.meta.unbox(boxed), shardings

  def init_state(self, rng: jax.Array, shardings: Any) -> dict[str, Any]:
    init = jax.jit(lambda r: nn.meta.unbox(self._init_boxed(r)), out_shardings=shardings)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return init(rng)

  # == Update step ===============================================================================
  def loss_fn(self, params, batch, rng):
    dropout_rng, sample_rng = jax.random.split(rng)
    variables, rngs = {"params": params["encoder"]}, {"dropout": dropout_rng}
    title_loss = None
    if self.config.train.both_views:  # Each row through both heads: 2B samples of their classes.
      queries, documents = self.batch_format.both_views(variables, batch, train=True, rngs=rngs)
      if self.model.title_match_dim:  # image parts to the loss below; title parts matched in the batch
        (queries, expected), (documents, titles) = (title_match_lib.split(e, self.model.embed_dim)
                                                    for e in (queries, documents))
        title_loss = title_match_loss.title_match_loss(expected, titles, self.batch_format.present(batch),
                                                       self.margin_fn)
      if self.config.head.loss == "info_nce":  # row i's two views are each other's positive
        scale = info_nce.logit_scale(params["logit_scale_log"])
        loss, aux = info_nce.info_nce_loss(queries, documents, scale), {
            "accuracy": info_nce.in_batch_accuracy(queries, documents), "logit_scale": scale}
        return self._with_title_loss(loss, aux, title_loss)
      embeddings = jnp.concatenate([queries, documents])
      labels = jnp.concatenate([batch["label"], batch["label"]])
    else:
      embeddings, labels = self.batch_format.own_view(variables, batch, rngs=rngs), batch["label"]
    head = self.config.head
    loss, aux = sharded_softmax.margin_softmax_loss(
        embeddings, labels, params["class_centers"], num_classes=self.num_classes,
        margin_fn=self.margin_fn, mesh=self.mesh, batch_axes=self.batch_axes, class_axes=self.class_axes,
        chunk_size=head.chunk_size or None, compute_dtype=jnp.dtype(head.dtype),
        partial_fc_rate=head.partial_fc_rate if head.partial_fc_rate < 1 else None, sample_key=sample_rng)
    return self._with_title_loss(loss, aux, title_loss)

  @staticmethod
  def _with_title_loss(loss, aux, title_loss):
    """The class loss plus the title-matching loss (equal weights), both reported."""
    if title_loss is None:
      return loss, aux
    title_nll, title_accuracy = title_loss
    return loss + title_nll, {**aux, "class_loss": loss, "title_loss": title_nll, "title_accuracy": title_accuracy}

  def train_step(self, state, batch, base_rng):
    # The step's randomness is a function of the step alone, so a resumed run replays it exactly.
    rng = jax.random.fold_in(base_rng, state["step"])
    (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state["params"], batch, rng)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, "accuracy": aux["accuracy"], "grad_norm": grad_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
               **{k: aux[k] for k in ("title_loss", "title_accuracy") if k in aux}}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def jit_train_step(self, shardings):
    step = jax.jit(self.train_step, in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                   donate_argnums=(0,))

    def run(state, batch, rng):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return step(state, batch, rng)
    return run

  # == Predict (for evaluators) ==================================================================
  def jit_predict(self):
    def predict(params, batch):
      queries, documents = self.batch_format.both_views({"params": params["encoder"]}, batch, train=False)
      return {"query": queries, "doc": documents}
    predict = jax.jit(predict)

    def run(params, batch):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return predict(params, batch)
    return run

  def jit_pooled(self, params):
    """device_batch -> the image tower's own pooled features f32[B, W] (the "frozen pretrained" row)."""
    pooled = jax.jit(lambda p, images: self.model.apply(
        {"params": p}, images, method=lambda m, x: m.image_encoder(x, train=False)[1]))

    def run(batch):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return pooled(params["encoder"], batch["image"])
    return run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
                       stop_at_step: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the experiment in `workdir`; returns the first and last eval metrics.

  Resumption is exact: the checkpoint of step k holds everything but the input position, which
  is k itself (the batch stream is a function of the seed), and step k+1's randomness is
  `fold_in(seed, k+1)`; on CPU a resumed run ends bitwise equal to an uninterrupted one.
  `stop_at_step` ends the loop after that step without the final evaluation, as a preempted job
  would (for preemption drills and tests).
  """
  config_schema.validate(config)
  mesh = sharding.make_mesh(config.mesh.shape)  # a mesh the devices can't hold fails before any work
  logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)
  pretrained_towers.check_shipped(config.model)
  # One live run per workdir; nothing is written in it before the config is known to fit what it holds.
  with workdir_lock.hold(workdir, stale_after_s=config.train.lock_stale_s):
    run_config.start(config, workdir)  # config.json for a fresh run, config_history.jsonl for a changed resume
    return _train(config, workdir, mesh, progress=progress, stop_at_step=stop_at_step)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, *, progress: bool,
           stop_at_step: int | None) -> dict[str, Any]:
  # == Data ======================================================================================
  prepared = run_data.prepare_data(config.data, workdir, seed=config.seed, progress=progress)
  logging.info("Records in %s: %d classes, skipped %s", prepared.records_dir, prepared.num_classes,
               prepared.summary.get("skipped", {}))

  # == Model & init ==============================================================================
  task = OclearTask(config, mesh, num_classes=prepared.num_classes, vocab_size=prepared.vocab_size,
                    title_special_ids=prepared.title_special_ids)
  place = lambda b: sharding.global_batch(b, mesh, task.rules)
  # Records, or the frozen towers' outputs of every catalogue row, computed once and cached.
  inputs = input_sources.make_input(config, prepared, place, workdir, progress=progress)
  abstract, shardings = task.abstract_state()
  sharding.check_sufficiently_sharded(abstract, shardings, int(config.sharding.max_replicated_mib * 2**20))
  store = checkpoint_lib.train_store(workdir, config.train)  # from here on, SIGTERM saves the step in flight

  # == Restore ===================================================================================
  state, start_step = store.restore(checkpoint_lib.abstract_with_shardings(abstract, shardings))
  if state is None:
    state, start_step = task.init_state(jax.random.key(config.seed), shardings), 0
    # Fresh runs only: a restored state already holds the (fine-tuned) tower weights.
    state = pretrained_towers.load_pretrained_into_state(state, shardings, config.model)
  else:
    logging.info("Resumed from step %d", start_step)
  store.report_broken(start_step)

  # == Evaluators (config.evals) =================================================================
  writer = metric_writers.MetricWriter(workdir, resume_step=start_step)  # rows past start_step: dropped
  evaluators = registry.make_evaluators(config, task, inputs, workdir, writer)
  for evaluator in evaluators:
    evaluator.start(state, shardings, start_step)

  # == Loop ======================================================================================
  train_step = task.jit_train_step(shardings)
  base_rng = jax.random.key(config.seed + 1)
  batches = inputs.train_batches(start_step)
  progress_line = metric_writers.ProgressLine(config.train.num_steps, config.train.batch_size, start_step)
  last_step = min(config.train.num_steps, stop_at_step or config.train.num_steps)
  unchecked = None  # (step, metrics, batch ids): finiteness is read one step late, not to stall the device
  try:
    for step in range(start_step + 1, last_step + 1):
      host_batch = next(batches)
      state, metrics = train_step(state, inputs.to_device(host_batch), base_rng)
      if unchecked:
        _check_finite(*unchecked, workdir=workdir, store=store)
      unchecked = (step, metrics, host_batch["id"])
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        line, examples_per_s = progress_line.update(step, scalars)
        if progress:
          print(line, flush=True)
        else:
          logging.info(line)
        writer.write(step, {**{f"train/{k}": v for k, v in scalars.items()}, "train/examples_per_s": examples_per_s})
      if store.should_save(step):  # every train.checkpoint_every steps, the last one, and when preempted
        _check_finite(*unchecked, workdir=workdir, store=store)  # never save a state that saw a NaN
        store.save(step, state, force=True)
      store.stop_if_preempted(step)  # raises Preempted once that save is on disk (main.py: exit code 75)
      if config.eval.every and step % config.eval.every == 0 and step != config.train.num_steps:
        _check_finite(*unchecked, workdir=workdir, store=store)  # never evaluate or select a state that saw a NaN
        for evaluator in evaluators:
          evaluator.at_step(state, step)
    if unchecked:
      _check_finite(*unchecked, workdir=workdir, store=store)
    final_step = int(jax.device_get(state["step"]))
    if last_step == config.train.num_steps:  # not a drill (stop_at_step stops as a preempted job would)
      for evaluator in evaluators:
        evaluator.last(state, final_step)
  finally:
    store.close()
    for evaluator in evaluators:
      evaluator.close()
    writer.close()
  return {"final_step": final_step, **{evaluator.name: evaluator.result for evaluator in evaluators}}


def _check_finite(step: int, metrics: dict[str, jax.Array], batch_ids: np.ndarray, *, workdir: str,
                  store: checkpoint_lib.CheckpointStore) -> None:
  """Stops the run at a non-finite loss or gradient, naming the step and writing the batch's ids."""
  if bool(jax.device_get(metrics["finite"])):
    return
  loss, grad_norm = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
  path = os.path.join(workdir, "nonfinite", f"step_{step}.json")
  if jax.process_index() == 0:
    paths.makedirs(os.path.dirname(path))
    ids = [i.decode("utf-8", "replace") if isinstance(i, bytes) else str(i) for i in np.asarray(batch_ids).tolist()]
    with paths.open(path, "w") as f:
      json.dump({"step": step, "loss": loss, "grad_norm": grad_norm, "ids": ids}, f, indent=1)
  store.wait()
  raise FloatingPointError(
      f"the loss ({loss}) or gradient norm ({grad_norm}) is not finite at step {step}; this process's batch ids "
      f"are in {path}. Nothing after step {store.latest_step()} was saved (the last good checkpoint); "
      f"look at those examples, or lower config.optimizer.learning_rate, then rerun to resume")
