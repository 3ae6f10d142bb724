"""How much of a trained run a catalogue gets: its parts weighed on the catalogue itself, without labels.

A run's embeddings are made of parts (models/title_match.py): the trained image part (the head over
the image tower; on the document side with the title's bounded term) and the title-matching part
(G(photo) against F(title)), joined with weight w. Beside them, the image tower's own pooled features
x rank as the frozen tower does. A composition (b, titles) serves

  query . doc = b * cos(img_q, img_d) + (1 - b) * cos(x_q, x_d) + b * w * cos(G, F)      titles on
  query . doc = b * cos(img_q, img_d') + (1 - b) * cos(x_q, x_d)                          titles off

(img_d' the document of its image alone), one unit vector per side (`vectors`: divided by sqrt(1 + b w)).
b = 1 with titles is the run as trained (its own embeddings' scores), b = 0 the frozen tower.

`choose` weighs them on the catalogue at hand by hidden-title agreement (`agreement`): each titled
document's image queries the other documents (its own title never enters the query), and the score
is the mean cosine, in the text tower's centred title space, between the query's own title and the
titles of its top `k` results. No label is read. A composition other than the frozen tower is used
only when the best one lifts agreement over the frozen tower's by more than `z` paired standard errors:
the run's parts have to earn their place on each catalogue. A catalogue without titles gives no
evidence and gets the frozen tower. benchmarks/transfer.py measures the choice on held-out products,
another retailer and renamed titles.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from oclear_jax.models import title_match
from oclear_jax.models.fusion import l2_normalize
from oclear_jax.retrieval import exact_search
from oclear_jax.retrieval import title_feedback

HEAD_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class Composition:
  head: float  # b: the trained image part's share, the frozen tower's is 1 - b
  titles: bool  # the document's title terms and title matching

  @property
  def name(self) -> str:
    if self.head == 0:
      return "frozen tower"
    return f"b={self.head:g}, titles {'on' if self.titles else 'off'}"


FROZEN = Composition(0.0, False)
AS_TRAINED = Composition(1.0, True)


def vectors(outputs: dict[str, jax.Array], composition: Composition, *, embed_dim: int, title_match_dim: int,
            title_match_weight: float) -> tuple[jax.Array, jax.Array]:
  """(queries, documents) f32[n, *] of `outputs` (`trained_run.HEADS['views_and_towers']`) under `composition`;
  jnp, so that a served model composes on the device (`trained_run.TrainedModel.composition`)."""
  def split(joined):
    if not title_match_dim:
      return l2_normalize(joined), jnp.zeros((joined.shape[0], 0), jnp.float32)
    return title_match.split(joined, embed_dim)
  outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items() if k != "title"}
  (q_img, g), (d_img, f), (d_alone, _) = split(outputs["query"]), split(outputs["doc"]), split(outputs["doc_image"])
  x, b = l2_normalize(outputs["pooled"]), composition.head
  t = b * title_match_weight if composition.titles else 0.0
  d_img = d_img if composition.titles else d_alone
  scale = 1.0 / math.sqrt(1.0 + t)  # unit vectors: scores on the run's own scale (title feedback's softmax)
  parts = [(w, q, d) for w, q, d in ((b, q_img, d_img), (1 - b, x, x), (t, g, f)) if w > 0]  # no zero columns
  queries = jnp.concatenate([math.sqrt(w) * q for w, q, _ in parts], axis=1) * scale
  documents = jnp.concatenate([math.sqrt(w) * d for w, _, d in parts], axis=1) * scale
  return queries, documents


def agreement(queries: np.ndarray, documents: np.ndarray, titles: np.ndarray, rows: np.ndarray, *,
              k: int = 5) -> np.ndarray:
  """f32[len(rows)]: per query row, the mean cosine of its own title vector with its top-k documents' titles
  (`titles`: unit, centred; itself excluded)."""
  ids = np.arange(len(documents))
  _, top = exact_search.exact_top_k(queries[rows], documents, min(k, len(documents) - 1), exclude=(rows, ids))
  top = np.asarray(top)
  picked = np.where(top[..., None] >= 0, titles[np.maximum(top, 0)], 0.0)
  return np.einsum("qt,qkt->q", titles[rows], picked) / top.shape[1]


def choose(outputs: dict[str, np.ndarray], titles: np.ndarray | None, *, embed_dim: int, title_match_dim: int,
           title_match_weight: float, k: int = 5, z: float = 2.0, max_queries: int = 2000,
           seed: int = 0) -> tuple[Composition, dict]:
  """(the composition to serve, the evidence): argmax of hidden-title agreement over b in HEAD_WEIGHTS, titles
  on or off, kept only if it beats the frozen tower by more than z paired standard errors (module docstring).

  `titles`: f32[n, T] unit title vectors of the rows (`title_feedback.gallery_title_vectors`), zero rows for
  untitled ones; None: no titles. Up to `max_queries` titled rows (seeded sample) query all rows.
  """
  present = np.flatnonzero(np.any(titles != 0, axis=1)) if titles is not None else np.zeros(0, np.int64)
  if len(present) < 2:
    return FROZEN, {"chosen": FROZEN.name, "head": 0.0, "titles": False,
                    "why": "no titles: no label-free evidence, the frozen tower is served"}
  rows = np.sort(np.random.default_rng(seed).choice(present, min(max_queries, len(present)), replace=False))
  shape = dict(embed_dim=embed_dim, title_match_dim=title_match_dim, title_match_weight=title_match_weight)
  scored = {}
  for composition in [FROZEN] + [Composition(b, on) for b in HEAD_WEIGHTS for on in (True, False)]:
    queries, documents = vectors(outputs, composition, **shape)
    scored[composition] = agreement(np.asarray(queries), np.asarray(documents), titles, rows, k=k)
  frozen = scored[FROZEN]
  best = max(scored, key=lambda c: scored[c].mean())
  gain = scored[best] - frozen
  stderr = float(gain.std(ddof=1) / math.sqrt(len(gain))) if len(gain) > 1 else math.inf
  chosen = best if best != FROZEN and gain.mean() > z * stderr else FROZEN
  evidence = {"chosen": chosen.name, "head": chosen.head, "titles": chosen.titles, "queries": int(len(rows)), "k": k,
              "agreement": {c.name: float(s.mean()) for c, s in scored.items()},
              "best": best.name, "gain_over_frozen": float(gain.mean()), "stderr": stderr, "z": z}
  return chosen, evidence


def has_frozen_tower(model_config) -> bool:
  """Are the run's image tower's pooled features the pretrained tower's own (pretrained and frozen)?"""
  return bool(model_config.image_pretrained and model_config.freeze_image_tower)


def weigh(model_config, outputs: dict[str, np.ndarray], *, documents: np.ndarray | None = None,
          seed: int = 0) -> tuple[Composition | None, dict | None]:
  """`choose` on a catalogue's embedded rows (`documents`: bool mask of the gallery rows, default all), with
  their text tower's titles centred by the gallery's mean; (None, None) unless the run's image tower is the
  pretrained one, frozen (else its pooled features are no frozen tower to weigh against: the run as trained)."""
  if not has_frozen_tower(model_config):
    return None, None
  documents = np.ones(len(outputs["pooled"]), bool) if documents is None else np.asarray(documents, bool)
  outputs = {k: np.asarray(v)[documents] for k, v in outputs.items()}
  titles = outputs.get("title")
  titles = None if titles is None else title_feedback.gallery_title_vectors(titles, np.ones(len(titles), bool))
  return choose(outputs, titles, embed_dim=model_config.embed_dim, title_match_dim=model_config.title_match_dim,
                title_match_weight=model_config.title_match_weight, seed=seed)


def served_vectors(model_config, outputs: dict[str, np.ndarray],
                   composition: Composition | None) -> tuple[np.ndarray, np.ndarray]:
  """(queries, documents) as served: `vectors` under `composition`, the run's own embeddings for None."""
  if composition is None:
    return np.asarray(outputs["query"]), np.asarray(outputs["doc"])
  queries, documents = vectors(outputs, composition, embed_dim=model_config.embed_dim,
                               title_match_dim=model_config.title_match_dim,
                               title_match_weight=model_config.title_match_weight)
  return np.asarray(queries), np.asarray(documents)


def from_manifest(entry: dict | None) -> Composition | None:
  """The composition an index recorded (`choose`'s evidence plus head/titles), None: the run as trained."""
  return Composition(float(entry["head"]), bool(entry["titles"])) if entry else None
