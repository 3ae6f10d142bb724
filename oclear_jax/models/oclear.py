"""OCLEAR: one image tower for shopper photos and catalogue shots, separate heads, fused titles.

query = normalize(query_head(image_tower(photo)))
doc   = normalize(fusion(doc_head(image_tower(catalogue_image)), text_tower(title)))
With `title_match_dim` > 0 each gains a title-matching part: the title the photo suggests, the title the
document has (models/title_match.py), so a title also reaches image-only queries.

The image tower is shared because both sides are photos of the same products and the tower holds
nearly all parameters; the two small heads absorb the domain gap (lighting, clutter, crops in
shopper photos vs. clean studio shots). With `shared_heads=True` one head serves both sides, so an
untitled document and a query of the same image get the same embedding. Class centres are not
here: the trainer keeps them beside this module, sharded by class.

Towers are looked up by name in `IMAGE_TOWERS` / `TEXT_TOWERS`; a new backbone (EfficientNet-Lite0,
a pretrained MiniLM) registers a builder and needs no change here; a builder passes the config's
per-backend options (`compute_dtype`, `remat`, `conv_impl`) to the towers that have them. An
image tower maps f32[B, H, W, 3] in [-1, 1] to (tokens, pooled f32[B, width]); a text tower maps
int32[B, L] ids (pad 0) to (tokens, pooled f32[B, width], mask).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oclear_jax import config_schema
from oclear_jax.models import accelerator
from oclear_jax.models import fusion as fusion_lib
from oclear_jax.models.fusion import l2_normalize
from oclear_jax.models import text as text_lib
from oclear_jax.models import title_match as title_match_lib
from oclear_jax.models import vit


# The defaults' one home is `config_schema.base_config()`; these dataclasses read theirs from it.
_SCHEMA = config_schema.base_config().model


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """`config.model.text`."""
  width: int = _SCHEMA.text.width
  depth: int = _SCHEMA.text.depth
  num_heads: int = _SCHEMA.text.num_heads
  mlp_dim: int = _SCHEMA.text.mlp_dim
  pool: str = _SCHEMA.text.pool


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The `config.model` section the model reads; each default is the schema's (`config_schema.py`)."""
  image_tower: str = _SCHEMA.image_tower
  vit: Any = _SCHEMA.vit  # a VIT_PRESETS name, or {width, depth, num_heads, mlp_dim}
  patch_size: int = _SCHEMA.patch_size
  text_tower: str = _SCHEMA.text_tower
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  embed_dim: int = _SCHEMA.embed_dim
  head_hidden: int = _SCHEMA.head_hidden
  head: str = _SCHEMA.head
  fusion: str = _SCHEMA.fusion
  title_dropout: float = _SCHEMA.title_dropout
  shared_heads: bool = _SCHEMA.shared_heads
  concept_slots: int = _SCHEMA.concept_slots
  concept_heads: int = _SCHEMA.concept_heads
  title_match_dim: int = _SCHEMA.title_match_dim  # > 0: a title-matching part (models/title_match.py)
  title_match_weight: float = _SCHEMA.title_match_weight
  freeze_image_tower: bool = _SCHEMA.freeze_image_tower
  freeze_text_tower: bool = _SCHEMA.freeze_text_tower
  # Per-backend choices (models/accelerator.py) the builders pass to the towers; none changes the parameters.
  # 'auto': bfloat16 and XLA's convolutions on GPU/TPU, float32 and the CPU convolution tricks on CPU.
  dtype: str = _SCHEMA.dtype  # the towers' compute dtype: auto | float32 | bfloat16 (parameters stay float32)
  remat: str = _SCHEMA.remat  # none | blocks: recompute each tower block in the backward pass
  conv_impl: str = _SCHEMA.conv_impl  # convolutional towers: auto | xla | cpu_tricks
  # Not config keys (the schema has none of them): fixed ViT pooling and tower dropout, and the
  # tokenizer's [CLS], [SEP] ids, which build_model(title_special_ids=...) takes from the records.
  vit_pool: str = "mean"
  dropout: float = 0.0
  title_special_ids: tuple[int, ...] = fusion_lib.DEFAULT_SPECIAL_IDS

  def __post_init__(self):
    accelerator.check_dtype(self.dtype)
    accelerator.check_remat(self.remat)
    accelerator.check_conv_impl(self.conv_impl)

  @property
  def output_dim(self) -> int:
    """Width of the query and document embeddings: embed_dim, plus the title-matching part when on."""
    return self.embed_dim + self.title_match_dim

  @property
  def compute_dtype(self) -> jnp.dtype:
    """`dtype` for this backend, resolved when read: 'auto' is bfloat16 on GPU/TPU, float32 on CPU."""
    return accelerator.compute_dtype(self.dtype)

  @classmethod
  def from_config(cls, config: Any) -> ModelConfig:
    """From a ModelConfig, a mapping or an ml_collections ConfigDict; absent fields keep the schema's defaults."""
    if isinstance(config, cls):
      return config
    values = {f.name: _get(config, f.name) for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if v is not None}
    if "text" in values and not isinstance(values["text"], TextConfig):
      text_values = {f.name: _get(values["text"], f.name) for f in dataclasses.fields(TextConfig)}
      values["text"] = TextConfig(**{k: v for k, v in text_values.items() if v is not None})
    if "title_special_ids" in values:
      values["title_special_ids"] = tuple(int(i) for i in values["title_special_ids"])
    return cls(**values)


def _get(config: Any, name: str) -> Any:
  if isinstance(config, Mapping):
    return config.get(name)
  return getattr(config, name, None)


class ProjectionHead(nn.Module):
  """Dense(width -> hidden) + GELU + Dense(-> embed_dim): maps tower features to the retrieval space."""
  hidden: int
  embed_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.gelu(vit.partitioned_dense(self.hidden, ("embed", "mlp"), name="fc1")(x))
    x = nn.with_logical_constraint(x, ("batch", "mlp"))
    x = vit.partitioned_dense(self.embed_dim, ("mlp", "proj"), name="fc2")(x)
    return nn.with_logical_constraint(x, fusion_lib.EMBED_AXES)


class IdentityLinearHead(nn.Module):
  """x / |x| -> Dense(width -> embed_dim) with the kernel initialised to the identity.

  Why: a randomly initialised head throws away what the pretrained tower knows, and on unseen
  products a small head trained on frozen features ends below the raw features it started from
  (PITFALLS.md). Started at the identity, step 0 ranks exactly as the frozen tower's cosine does,
  and training only moves the space away from it where the categories ask for it; the linear map
  (no hidden layer) keeps that move small and easy to regularise. Needs embed_dim == the tower's
  width (1280 for EfficientNet-Lite0).
  """
  embed_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.embed_dim:
      raise ValueError(f"model.head='identity_linear' needs model.embed_dim == the image tower's width; got "
                       f"embed_dim={self.embed_dim}, width={x.shape[-1]}: set model.embed_dim={x.shape[-1]}")
    identity = lambda key, shape, dtype=jnp.float32: jnp.eye(*shape, dtype=dtype)
    x = vit.partitioned_dense(self.embed_dim, ("embed", "proj"), name="linear", kernel_init=identity)(l2_normalize(x))
    return nn.with_logical_constraint(x, fusion_lib.EMBED_AXES)


HEADS = ("mlp", "identity_linear")


class OclearModel(nn.Module):
  """Query and document embeddings (unit norm, f32[B, embed_dim]); see the module docstring.

  No defaults: `build_model` passes every field from `config.model` (defaults: `config_schema.py`).
  """
  image_encoder: nn.Module
  text_encoder: nn.Module | None
  embed_dim: int
  head_hidden: int
  head: str
  fusion: str
  title_dropout: float
  shared_heads: bool
  title_special_ids: tuple[int, ...]
  concept_slots: int
  concept_heads: int
  title_match_dim: int
  title_match_weight: float
  # A frozen tower runs in inference mode behind stop_gradient: no backward pass (nor update) through it.
  freeze_image_tower: bool
  freeze_text_tower: bool

  def setup(self):
    if self.fusion != "image_only" and self.text_encoder is None:
      raise ValueError(f"fusion={self.fusion!r} needs a text_encoder; pass one or use fusion='image_only'")
    make_head = (lambda: IdentityLinearHead(self.embed_dim)) if self.head == "identity_linear" else (
        lambda: ProjectionHead(self.head_hidden, self.embed_dim))
    if self.shared_heads:
      self.shared_head = make_head()
    else:
      self.query_head = make_head()
      self.doc_head = make_head()
    # With the identity head the title term starts at zero too: step 0 is the frozen tower, documents included.
    self.doc_fusion = fusion_lib.DocumentFusion(self.fusion, self.title_dropout, self.concept_slots,
                                                self.concept_heads, zero_init=self.head == "identity_linear")
    if self.title_match_dim:
      self.title_match = title_match_lib.TitleMatch(self.title_match_dim, self.title_match_weight)

  def _image_features(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """(spatial tokens f32[B, N, W], pooled f32[B, W]) of the image tower."""
    tokens, pooled = self.image_encoder(images, train=train and not self.freeze_image_tower)
    if self.freeze_image_tower:
      tokens, pooled = jax.lax.stop_gradient((tokens, pooled))
    return tokens, pooled

  def _title_features(self, title_tokens: jax.Array | None, train: bool) -> fusion_lib.TitleFeatures | None:
    if self.fusion == "image_only":
      return None
    if title_tokens is None:
      raise ValueError(f"fusion={self.fusion!r} needs title_tokens int32[B, L] (all padding for no title)")
    tokens, pooled, mask = self.text_encoder(title_tokens, train=train and not self.freeze_text_tower)
    if self.freeze_text_tower:
      tokens, pooled = jax.lax.stop_gradient((tokens, pooled))
    return fusion_lib.TitleFeatures(tokens, pooled, mask,
                                    fusion_lib.title_present(title_tokens, self.title_special_ids))

  def _query_head(self, features: jax.Array) -> jax.Array:
    return self.shared_head(features) if self.shared_heads else self.query_head(features)

  def _doc_head(self, features: jax.Array) -> jax.Array:
    return self.shared_head(features) if self.shared_heads else self.doc_head(features)

  def embed_queries(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Shopper photos f32[B, H, W, 3] in [-1, 1] -> unit f32[B, embed_dim]. Queries never read text."""
    return self.queries_from_features(self._image_features(images, train)[1])

  def embed_documents(self, images: jax.Array, title_tokens: jax.Array | None, *, train: bool = False) -> jax.Array:
    """Catalogue images and title ids int32[B, L] (pad 0) -> unit f32[B, embed_dim]."""
    tokens, pooled = self._image_features(images, train)
    return self.documents_from_features(tokens, pooled, self._title_features(title_tokens, train), train=train)

  def __call__(self, images: jax.Array, title_tokens: jax.Array | None, is_query: jax.Array, *,
               train: bool = False) -> jax.Array:
    """The training path on a mixed batch: one image-tower pass, both heads, a per-example pick.

    Queries also run through the text tower (their titles are empty, so fusion leaves them
    untouched); that costs a small text pass but keeps shapes static and the batch unsplit.
    """
    tokens, pooled = self._image_features(images, train)
    return self.from_features(tokens, pooled, self._title_features(title_tokens, train), is_query, train=train)

  def both_views(self, images: jax.Array, title_tokens: jax.Array | None, *,
                 train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(query view, document view), each unit f32[B, embed_dim], of every row: one tower pass.

    Training on both views makes every image a sample of its class through both heads, so both
    heads learn from every row, and a catalogue without shopper photos still trains the query head
    (an untitled row's document view is its image alone).
    """
    tokens, pooled = self._image_features(images, train)
    title = self._title_features(title_tokens, train)
    return (self.queries_from_features(pooled),
            self.documents_from_features(tokens, pooled, title, train=train))

  def views_and_towers(self, images: jax.Array, title_tokens: jax.Array | None) -> dict[str, jax.Array]:
    """Inference, one tower pass: both views, the document of the image alone, the image tower's pooled f32[B, W]
    and, with a text tower, its pooled titles f32[B, T] (zero rows: untitled): what `--mode=evaluate` scores."""
    tokens, pooled = self._image_features(images, False)
    title = self._title_features(title_tokens, False)
    out = {"query": self.queries_from_features(pooled), "doc": self.documents_from_features(tokens, pooled, title),
           "pooled": pooled}
    if title is None:
      return {**out, "doc_image": out["doc"]}
    untitled = title._replace(present=jnp.zeros_like(title.present))  # the document of the image alone
    return {**out, "doc_image": self.documents_from_features(tokens, pooled, untitled),
            "title": jnp.where(title.present[:, None], title.pooled, 0.0)}

  # == From tower features: the same heads and fusion over precomputed (frozen) tower outputs ====
  def queries_from_features(self, image_pooled: jax.Array) -> jax.Array:
    queries = l2_normalize(self._query_head(image_pooled))
    return self.title_match.query(queries, image_pooled) if self.title_match_dim else queries

  def documents_from_features(self, image_tokens: jax.Array, image_pooled: jax.Array,
                              title: fusion_lib.TitleFeatures | None, *, train: bool = False) -> jax.Array:
    documents = l2_normalize(self.doc_fusion(self._doc_head(image_pooled), title, image_tokens, train=train))
    return self.title_match.document(documents, image_pooled, title) if self.title_match_dim else documents

  def from_features(self, image_tokens: jax.Array, image_pooled: jax.Array, title: fusion_lib.TitleFeatures | None,
                    is_query: jax.Array, *, train: bool = False) -> jax.Array:
    """`__call__` after the towers: with frozen towers, cached features train the same model."""
    queries = self.queries_from_features(image_pooled)
    documents = self.documents_from_features(image_tokens, image_pooled, title, train=train)
    return jnp.where(jnp.asarray(is_query)[:, None], queries, documents)


# == Tower registries ===========================================================================
ImageTowerBuilder = Callable[[ModelConfig], nn.Module]
TextTowerBuilder = Callable[[ModelConfig, int, int], nn.Module]  # (config, vocab_size, max_len)
IMAGE_TOWERS: dict[str, ImageTowerBuilder] = {}
TEXT_TOWERS: dict[str, TextTowerBuilder] = {}


def _registrar(table: dict[str, Callable], kind: str) -> Callable[[str], Callable[[Callable], Callable]]:
  def register_as(name: str) -> Callable[[Callable], Callable]:
    def register(builder: Callable) -> Callable:
      if name in table:
        raise ValueError(f"{kind} tower {name!r} is already registered")
      table[name] = builder
      return builder
    return register
  return register_as


register_image_tower = _registrar(IMAGE_TOWERS, "image")
register_text_tower = _registrar(TEXT_TOWERS, "text")

registered_name = lambda tower: tower.partition(":")[0]  # a checkpoint 'hf:FOLDER' is built by the 'hf' builder


@register_image_tower("vit")
def _build_vit(config: ModelConfig) -> nn.Module:
  return vit.ViTEncoder(patch_size=config.patch_size, dropout=config.dropout, pool=config.vit_pool,
                        dtype=config.compute_dtype, remat=config.remat, **vit.vit_sizes(config.vit))


@register_text_tower("transformer")
def _build_text_transformer(config: ModelConfig, vocab_size: int, max_len: int) -> nn.Module:
  t = config.text
  return text_lib.TextEncoder(vocab_size=vocab_size, max_len=max_len, width=t.width, depth=t.depth,
                              num_heads=t.num_heads, mlp_dim=t.mlp_dim, dropout=config.dropout, pool=t.pool,
                              dtype=config.compute_dtype, remat=config.remat)


def _check_tower_options(tower: nn.Module | None, config: ModelConfig) -> None:
  """A built tower carries the config's dtype, remat and conv_impl, or lacks the option and is not asked for it.

  Builders pass the options (they are the tower's own attributes); a registered tower without a
  `dtype` field computes in float32, so asking it for bfloat16 is an error, as is remat for a tower
  without `remat`. A tower without `conv_impl` (the transformers) has no choice to make.
  """
  if tower is None:
    return
  fields, name = {f.name for f in dataclasses.fields(tower)}, type(tower).__name__
  if "dtype" not in fields and config.dtype == "bfloat16":
    raise ValueError(f"config.model.dtype='bfloat16' but the {name} tower computes in float32 only; set "
                     f"config.model.dtype='float32' or 'auto'")
  if "remat" not in fields and config.remat != "none":
    raise ValueError(f"config.model.remat={config.remat!r} but the {name} tower has no remat option; set "
                     f"config.model.remat='none'")
  given = {k: getattr(tower, k) for k in ("dtype", "remat", "conv_impl") if k in fields}
  wanted = dict(dtype=config.compute_dtype, remat=config.remat, conv_impl=config.conv_impl)
  if "dtype" in given:
    given["dtype"] = jnp.dtype(given["dtype"])
  for key, value in given.items():
    if value != wanted[key]:
      raise ValueError(f"config.model.{key} asks for {wanted[key]!r} but the {name} tower's builder set {value!r}: "
                       f"a tower builder passes config.compute_dtype, config.remat and config.conv_impl")


def _with_tokenizer_special_ids(model_config: Any, config: ModelConfig, special_ids: Any) -> ModelConfig:
  """The tokenizer's [CLS]/[SEP] ids win; a config that names other ids is a mistake, not an override."""
  special_ids = tuple(int(i) for i in special_ids)
  configured = _get(model_config, "title_special_ids")
  if isinstance(model_config, ModelConfig) and configured == fusion_lib.DEFAULT_SPECIAL_IDS:
    configured = None  # A dataclass default, not a choice.
  if configured is not None and tuple(int(i) for i in configured) != special_ids:
    raise ValueError(f"config.model.title_special_ids={tuple(configured)} but the tokenizer's [CLS], [SEP] "
                     f"ids are {special_ids}; remove config.model.title_special_ids (the records' "
                     f"tokenizer decides them)")
  return dataclasses.replace(config, title_special_ids=special_ids)


def build_model(model_config: Any, *, vocab_size: int, max_title_len: int,
                title_special_ids: Any = None) -> OclearModel:
  """`config.model` (ConfigDict, mapping or ModelConfig) + tokenizer facts -> an OclearModel.

  Tokenizer facts: `vocab_size`, `max_title_len` and `title_special_ids` (the tokenizer's [CLS],
  [SEP] ids, e.g. `PreparedData.title_special_ids`; None keeps `model.title_special_ids`).
  The towers get the per-backend options (`model.dtype`, `remat`, `conv_impl`) from their builders;
  the dtype's 'auto' is resolved here, from `jax.default_backend()` (`models/accelerator.py`).
  """
  config = ModelConfig.from_config(model_config)
  if title_special_ids is not None:
    config = _with_tokenizer_special_ids(model_config, config, title_special_ids)
  if registered_name(config.image_tower) not in IMAGE_TOWERS:
    raise ValueError(f"model.image_tower={config.image_tower!r} is unknown; registered: {sorted(IMAGE_TOWERS)}")
  if config.fusion not in fusion_lib.FUSIONS:
    raise ValueError(f"model.fusion={config.fusion!r} is unknown; use one of {fusion_lib.FUSIONS}")
  if config.head not in HEADS:
    raise ValueError(f"model.head={config.head!r} is unknown; use one of {HEADS}")
  if config.head == "identity_linear" and config.fusion not in fusion_lib.ZERO_INIT_FUSIONS:
    raise ValueError(f"model.head='identity_linear' starts the title term at zero, which fusion={config.fusion!r} "
                     f"cannot; use one of {fusion_lib.ZERO_INIT_FUSIONS}")
  if config.title_match_dim < 0 or (config.title_match_dim and not config.title_match_weight > 0):
    raise ValueError(f"model.title_match_dim={config.title_match_dim} must be >= 0 (0: off), and when on "
                     f"model.title_match_weight={config.title_match_weight} must be > 0")
  if config.title_match_dim and config.fusion == "image_only":
    raise ValueError("model.title_match_dim > 0 matches photos to titles, which fusion='image_only' has none of; "
                     "set model.title_match_dim=0 or a fusion that reads titles")
  if not 0.0 <= config.title_dropout <= 1.0:
    raise ValueError(f"model.title_dropout={config.title_dropout} must lie in [0, 1]")
  text_encoder = None
  if config.fusion != "image_only":
    if registered_name(config.text_tower) not in TEXT_TOWERS:
      raise ValueError(f"model.text_tower={config.text_tower!r} is unknown; registered: {sorted(TEXT_TOWERS)}")
    text_encoder = TEXT_TOWERS[registered_name(config.text_tower)](config, vocab_size, max_title_len)
  image_encoder = IMAGE_TOWERS[registered_name(config.image_tower)](config)
  for tower in (image_encoder, text_encoder):
    _check_tower_options(tower, config)
  # Every OclearModel field but the towers is a ModelConfig field of the same name.
  towers = ("image_encoder", "text_encoder", "parent", "name")
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(OclearModel) if f.name not in towers}
  return OclearModel(image_encoder=image_encoder, text_encoder=text_encoder, **fields)
