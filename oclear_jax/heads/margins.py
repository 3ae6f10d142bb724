"""Additive / multiplicative angular margins on cosine logits.

All functions here are pure and elementwise in spirit: they take a matrix of
cosine similarities ``cos`` (rows = examples, columns = a slice of classes) and
a boolean ``target_mask`` of the same shape that is True where the column is the
row's label, and return scaled logits. They know nothing about sharding, which
is why the sharded softmax can apply them to any class shard or class chunk: a
row whose label lives on another shard simply has an all-False mask row.

Margins follow insightface's ``CombinedMarginLoss``::

    target:     scale * (cos(m1 * theta + m2) - m3),  theta = arccos(cos)
    non-target: scale * cos

* CosFace (m1=1, m2=0, m3=m): ``scale * (cos - m)``. No arccos is computed.
* ArcFace (m1=1, m2=m, m3=0): ``scale * cos(theta + m)``. Once ``theta + m``
  exceeds pi, ``cos(theta + m)`` would start to *increase* again as the sample
  gets worse, rewarding the wrong direction. insightface's (non-"easy margin")
  rule replaces it there by the linear continuation ``cos - m * sin(m)``
  (its ``cos > cos(pi - m)`` test is the same as ``theta + m < pi``); we do the
  same. For m1 != 1 the fallback triggers on ``m1 * theta + m2 > pi``.

Efficiency: the margin is only needed at one column per row, so the
transcendentals are evaluated on a per-row vector (the row's target cosine),
not on the whole [rows, classes] matrix, then scattered back with ``where``.
This assumes each mask row has at most one True entry (one-hot labels), which
is always the case for classification targets.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

# Keeps arccos (and its gradient, -1/sqrt(1-x^2)) finite at |cos| -> 1.
_ARCCOS_EPS = 1e-7


class MarginFn(Protocol):
  """Signature of every margin function: (cos, target_mask) -> logits."""

  def __call__(self, cos: jax.Array, target_mask: jax.Array) -> jax.Array:
    ...


def _margined_target(tcos: jax.Array, m1: float, m2: float,
                     m3: float) -> jax.Array:
  """cos(m1*theta + m2) - m3 for a vector of target cosines (unscaled)."""
  if m1 == 1.0 and m2 == 0.0:
    return tcos - m3  # CosFace (or plain softmax): no angle needed.
  clipped = jnp.clip(tcos, -1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS)
  theta = jnp.arccos(clipped)
  angle = m1 * theta + m2
  fallback = tcos - m2 * math.sin(m2)
  return jnp.where(angle <= math.pi, jnp.cos(angle), fallback) - m3


def combined_margin(cos: jax.Array,
                    target_mask: jax.Array,
                    *,
                    scale: float,
                    m1: float = 1.0,
                    m2: float = 0.0,
                    m3: float = 0.0) -> jax.Array:
  """insightface's combined margin: ``scale * (cos(m1*theta + m2) - m3)``.

  Args:
    cos: f[..., K] cosine similarities in [-1, 1].
    target_mask: bool[..., K], True at the label column (at most one per row).
    scale: the logit scale ``s`` (e.g. 64).
    m1: multiplicative angular margin (SphereFace); 1.0 disables it.
    m2: additive angular margin (ArcFace); 0.0 disables it.
    m3: additive cosine margin (CosFace); 0.0 disables it.

  Returns:
    f[..., K] logits: margined on target entries, ``scale * cos`` elsewhere.
  """
  if m1 == 1.0 and m2 == 0.0 and m3 == 0.0:
    return scale * cos
  # At most one target per row, so this sum *is* the target cosine (0 where
  # the row's label is not in this slice; the value is then unused).
  tcos = jnp.sum(jnp.where(target_mask, cos, 0.0), axis=-1, keepdims=True)
  target = _margined_target(tcos, m1, m2, m3)
  return scale * jnp.where(target_mask, target.astype(cos.dtype), cos)


def cosface(cos: jax.Array,
            target_mask: jax.Array,
            *,
            scale: float = 64.0,
            margin: float = 0.35) -> jax.Array:
  """CosFace / AM-softmax: ``scale * (cos - margin)`` on targets."""
  return combined_margin(cos, target_mask, scale=scale, m3=margin)


def arcface(cos: jax.Array,
            target_mask: jax.Array,
            *,
            scale: float = 64.0,
            margin: float = 0.5) -> jax.Array:
  """ArcFace: ``scale * cos(theta + margin)`` on targets (see module doc)."""
  return combined_margin(cos, target_mask, scale=scale, m2=margin)


_MARGINS: dict[str, Callable[..., jax.Array]] = {
    "cosface": cosface,
    "arcface": arcface,
    "combined": combined_margin,
}


def make_margin(name: str, **kwargs: float) -> MarginFn:
  """Builds a ``(cos, target_mask) -> logits`` margin from a config name.

  Keyword arguments are validated here (not at first call inside a jitted
  train step) so a typo in a config fails immediately and readably.

  Args:
    name: one of "cosface", "arcface", "combined" (case-insensitive).
    **kwargs: hyper-parameters of that margin (``scale``, ``margin``, or
      ``m1``/``m2``/``m3`` for "combined").

  Returns:
    A functools.partial with the hyper-parameters bound.

  Raises:
    ValueError: unknown name.
    TypeError: unknown or missing hyper-parameters.
  """
  key = name.lower()
  if key not in _MARGINS:
    raise ValueError(f"Unknown margin {name!r}; valid margins are: "
                     f"{', '.join(sorted(_MARGINS))}.")
  fn = _MARGINS[key]
  try:
    inspect.signature(fn).bind(None, None, **kwargs)
  except TypeError as e:
    raise TypeError(f"Bad arguments {kwargs} for margin {key!r}: {e}") from e
  return functools.partial(fn, **kwargs)


def from_config(head) -> MarginFn:
  """The margin `config.head` names (`head.margin`, its scale and margin values)."""
  if head.margin.lower() == "combined":
    return make_margin("combined", scale=head.scale, m1=head.m1, m2=head.m2, m3=head.m3)
  return make_margin(head.margin, scale=head.scale, margin=head.margin_value)
