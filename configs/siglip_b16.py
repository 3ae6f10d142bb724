r"""SigLIP B/16 (image and text towers from a checkpoint folder) + a 1M-class margin-softmax head.

  # one GPU (arg 'gpu', the default): the whole image tower fine-tuned, the text tower frozen
  python -m oclear_jax.main --config=configs/siglip_b16.py --workdir=/tmp/siglip_b16 \
      --config.data.root=/data/catalogue --config.model.image_tower=hf:/ckpt/siglip-base-patch16-224 \
      --config.model.text_tower=hf:/ckpt/siglip-base-patch16-224 --config.data.tokenizer=hf:/ckpt/siglip-base-patch16-224

  # a pod slice (arg 'pod'): the same model, class centres split over every device, one global batch
  python -m oclear_jax.main --config=configs/siglip_b16.py:pod --workdir=gs://BUCKET/siglip_b16 \
      --config.data.root=gs://BUCKET/catalogue --config.model.image_tower=hf:gs://BUCKET/ckpt/siglip-base-patch16-224 ...

  # step time, MFU and memory of this model (compile-only memory on simulated CPU devices):
  python benchmarks/step_throughput.py --rows=siglip_b16_1m --compile_only --dtype=bfloat16 --remat=blocks

The checkpoint folder is `SiglipModel.save_pretrained`'s (config.json, model.safetensors,
preprocessor_config.json, spiece.model + tokenizer_config.json): both towers read their architecture,
weights and the tokenizer from it (README: "Bring a checkpoint"). The head starts at the identity on
SigLIP's joint image-text space (head='identity_linear', embed_dim = its 768), so step 0 ranks as the
checkpoint's own embeddings do, and the title term of the documents starts at zero (fusion='gated').
`CHECKPOINT` is a placeholder: override the three paths above.
"""
from oclear_jax import config_schema

CHECKPOINT = "hf:/checkpoints/siglip-base-patch16-224"
NUM_CLASSES = 1_000_000  # what the config is sized for; the real count comes from the records


def get_config(arg: str | None = None):
  """arg: 'gpu' (default, one device) or 'pod' (every device of a slice)."""
  target = arg or "gpu"
  if target not in ("gpu", "pod"):
    raise ValueError(f"configs/siglip_b16.py:{arg}: use 'gpu' or 'pod'")
  c = config_schema.base_config()
  c.data.source = "csv"
  c.data.root = "/data/catalogue"  # override on the command line
  c.data.stored_image_size = 256
  c.data.num_shards = 64 if target == "gpu" else 4096
  c.data.tokenizer = CHECKPOINT  # the checkpoint's own SentencePiece
  c.data.max_title_len = 32  # <= SigLIP's 64 positions (the tower pads to them, as it was trained)
  c.data.train_preprocess = "decode|random_resized_crop(224)|flip_lr|value_range(-1, 1)"
  c.data.eval_preprocess = "decode|resize(224)|value_range(-1, 1)"  # SigLIP's own normalisation is [-1, 1]

  c.model.image_tower = c.model.text_tower = CHECKPOINT
  c.model.image_pretrained = c.model.text_pretrained = True
  c.model.freeze_text_tower = True
  c.model.head = "identity_linear"
  c.model.embed_dim = 768
  c.model.fusion = "gated"
  c.model.dtype = "auto"  # bfloat16 on GPU/TPU
  c.model.remat = "blocks"

  c.head.margin = "cosface"
  c.head.scale = 64.0
  c.head.margin_value = 0.35
  c.head.chunk_size = 8192
  c.head.dtype = "bfloat16"
  c.optimizer.pretrained_lr_scale = 0.1  # the pretrained tower moves at a tenth of the heads' rate

  c.train.batch_size = 256 if target == "gpu" else 4096
  c.mesh.shape = (-1, 1)
  c.sharding.rules = (("batch", ("data", "model")), ("classes", ("data", "model")))
  return c
