r"""OCLEAR at 10^8 categories on a TPU pod slice (256 chips), e.g. a v5p-512 or v4-512 slice.

  # on every host of the slice (jax.distributed initializes itself from the TPU environment):
  python -m oclear_jax.main --config=configs/pod_100m.py --workdir=gs://BUCKET/oclear/pod_100m \
      --config.data.root=gs://BUCKET/catalogue_100m

  # what it costs per device, compile-only on simulated CPU devices (nothing is allocated):
  python benchmarks/classifier_scaling.py --pod_config

Layout: the ViT-B/16 backbone is replicated and data-parallel (add ("mlp", "data") and
("embed", "data") to `sharding.rules` for FSDP); the 10^8 x 512 class centres and their Adam
moments are split by class over all 256 devices (390,625 classes, ~2.3 GiB per device in f32);
each device scores the whole gathered global batch (4096 rows) against its shard in chunks of
8,192 classes, so logits temporaries stay O(4096 x 8192) instead of O(4096 x 390,625) (~6 GiB).
The softmax statistics are combined with pmax/psum; full logits never exist anywhere.
The curated catalogue comes from `--mode=govern` (data governance) over the raw logs.

32-device variant (`--config=configs/pod_100m.py:32`, e.g. a v5p-64 / v4-64 slice, 16 GiB per chip
assumed): 3,125,000 classes per device. f32 centres + f32 Adam are 17.9 GiB of state per device
before any temporaries, and bf16 centres with bf16 Adam moments still peak at ~18.2 GiB; what fits
is bf16 centres, a bf16 first moment and a factored (row x column) second moment, f32 arithmetic,
stochastic rounding: `oclear_jax.heads.center_optimizer.center_adam`, 5.97 GiB of state and ~14.9
GiB peak per device (compile-only, `python benchmarks/head_speed.py --sections=memory`; the chunked
head's custom backward keeps the centres' gradient in bf16 and its temporaries O(rows x chunk)).
Its quality cost on a small problem is in `--sections=quality`. The variant sets
`optimizer.centres_state='small'`: train/optimizer.make_optimizer gives `class_centers` to `center_adam`
(optax.partition) and every other parameter to AdamW as usual.
"""
from oclear_jax import config_schema

# The curated category count this config is sized for; the real count comes from the records.
NUM_CLASSES = 100_000_000


def get_config(arg: str | None = None):
  """arg: '' or '256' for the 256-device slice, '32' for the 32-device variant (see above)."""
  devices = int(arg or 256)
  if devices not in (32, 256):
    raise ValueError(f"configs/pod_100m.py:{arg}: the device count must be 256 or 32")
  c = config_schema.base_config()
  c.data.source = "csv"
  c.data.root = "gs://YOUR_BUCKET/catalogue_100m"  # override on the command line
  c.data.stored_image_size = 256
  c.data.num_shards = 4096
  c.data.tokenizer = ""
  c.data.vocab_size = 32000
  c.data.max_title_len = 32
  c.data.train_preprocess = "decode|random_resized_crop(224)|flip_lr|color_jitter|value_range(-1, 1)"
  c.data.eval_preprocess = "decode|resize(224)|value_range(-1, 1)"

  c.model.image_tower = "vit"
  c.model.vit = "b"
  c.model.patch_size = 16
  c.model.text.update(dict(width=384, depth=4, num_heads=6, mlp_dim=1536, pool="mean"))
  c.model.embed_dim = 512
  c.model.head_hidden = 1024

  c.head.margin = "cosface"
  c.head.scale = 64.0
  c.head.margin_value = 0.35
  c.head.chunk_size = 8192
  c.head.dtype = "bfloat16"  # bf16 cosines in the chunk loop; statistics and the loss stay f32
  c.head.param_dtype = "float32"  # f32 master centres: ~2.3 GiB/device with Adam at 256 devices
  c.head.partial_fc_rate = 1.0  # e.g. 0.1 scores every positive + 10% of negatives per shard

  if devices == 32:
    c.head.param_dtype = "bfloat16"  # bf16 master centres (2.98 GiB/device), stochastically rounded
    c.optimizer.centres_state = "small"  # bf16 first moment, factored second moment (see the docstring)
  c.mesh.shape = (-1, 1)
  c.sharding.rules = (("batch", ("data", "model")), ("classes", ("data", "model")))
  c.sharding.max_replicated_mib = 1024.0

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 5000
  c.optimizer.weight_decay = 0.05
  c.train.batch_size = 4096
  c.train.num_steps = 500_000
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.eval.every = 25_000
  c.eval.batch_size = 4096
  return c
