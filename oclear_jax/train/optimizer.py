"""The trainer's optimizer: AdamW on a warmup-cosine schedule, the class centres' small state, and the
pretrained towers frozen (no update, no moments) or slowed (`optimizer.pretrained_lr_scale`)."""
from __future__ import annotations

import jax
import ml_collections
import optax

from oclear_jax.heads import center_optimizer
from oclear_jax.train import pretrained_towers


def train_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer of a run: `make_optimizer` with the towers' rules (`pretrained_towers.tower_optimizer`).

  Frozen towers (config.model.freeze_*) and the image trunk before model.image_trainable_from get zero
  updates: no Adam step, no weight decay, no moments; optimizer.pretrained_lr_scale slows pretrained layers.
  """
  return pretrained_towers.tower_optimizer(make_optimizer(config.optimizer, config.train.num_steps), config)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, opt.learning_rate, warmup_steps=min(opt.warmup_steps, max(num_steps - 1, 1)),
      decay_steps=max(num_steps, opt.warmup_steps + 1), end_value=opt.learning_rate * 0.01)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # no decay on biases / norms
  adamw = optax.adamw(schedule, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
  clip = optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0 else optax.identity()
  if opt.centres_state == "adamw":
    return optax.chain(clip, adamw)
  # 'small': the class centres' Adam state in bf16 with a factored second moment (what lets 10^8 x 512
  # centres fit 32 devices of 16 GiB; heads/center_optimizer.py); every other parameter as above.
  small = center_optimizer.center_adam(schedule, b2=opt.b2, weight_decay=opt.weight_decay)
  labels = lambda params: {key: jax.tree.map(lambda _: "centres" if key == "class_centers" else "rest", value)
                           for key, value in params.items()}
  return optax.chain(clip, optax.partition({"rest": adamw, "centres": small}, labels))
