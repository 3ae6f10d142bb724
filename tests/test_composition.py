"""serving.composition: the run's parts weighed on a catalogue by hidden-title agreement, no labels read."""
import numpy as np

from oclear_jax.serving import composition

E, K, W = 8, 4, 0.5  # image part width, title-match width, title_match_weight


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _join(image, title):
  return np.concatenate([image, np.sqrt(W) * title], axis=1) / np.sqrt(1 + W)


def _outputs(rng, n, *, trained_sees, frozen_sees):
  """Rows in 10 planted groups; each part's vectors cluster by group only where it 'sees' them."""
  groups = rng.integers(10, size=n)
  centres = rng.normal(size=(10, E))
  part = lambda sees: _unit(rng.normal(size=(n, E)) + (3.0 * centres[groups] if sees else 0.0))
  img, g, f = part(trained_sees), _unit(rng.normal(size=(n, K))), _unit(rng.normal(size=(n, K)))
  out = {"query": _join(img, g), "doc": _join(img, f), "doc_image": _join(img, g), "pooled": 5.0 * part(frozen_sees)}
  titles = _unit(rng.normal(size=(n, 6)) + 3.0 * rng.normal(size=(10, 6))[groups])
  return out, titles


def test_as_trained_scores_are_the_runs_own_and_frozen_is_the_pooled_cosine():
  out, _ = _outputs(np.random.default_rng(0), 50, trained_sees=True, frozen_sees=False)
  shape = dict(embed_dim=E, title_match_dim=K, title_match_weight=W)
  q, d = composition.vectors(out, composition.AS_TRAINED, **shape)
  np.testing.assert_allclose(q @ d.T, out["query"] @ out["doc"].T, atol=1e-5)
  q, d = composition.vectors(out, composition.FROZEN, **shape)
  x = _unit(out["pooled"])
  np.testing.assert_allclose(q @ d.T, x @ x.T, atol=1e-5)
  q, d = composition.vectors(out, composition.Composition(0.5, False), **shape)
  np.testing.assert_allclose(q @ d.T, 0.5 * (out["query"][:, :E] * np.sqrt(1 + W)) @ (out["doc_image"][:, :E]
                                                                                      * np.sqrt(1 + W)).T
                             + 0.5 * x @ x.T, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)


def test_the_part_whose_neighbours_share_titles_is_chosen_and_the_frozen_tower_otherwise():
  shape = dict(embed_dim=E, title_match_dim=K, title_match_weight=W)
  out, titles = _outputs(np.random.default_rng(1), 400, trained_sees=True, frozen_sees=False)
  chosen, evidence = composition.choose(out, titles, **shape)
  assert chosen.head == 1.0 and evidence["gain_over_frozen"] > evidence["z"] * evidence["stderr"]
  out, titles = _outputs(np.random.default_rng(2), 400, trained_sees=False, frozen_sees=True)
  chosen, evidence = composition.choose(out, titles, **shape)
  assert chosen == composition.FROZEN and evidence["best"] == "frozen tower"
  # Neither sees the groups: whatever is best by chance does not beat the frozen tower significantly.
  out, titles = _outputs(np.random.default_rng(3), 400, trained_sees=False, frozen_sees=False)
  assert composition.choose(out, titles, **shape)[0] == composition.FROZEN
  assert composition.choose(out, None, **shape)[0] == composition.FROZEN  # no titles: no evidence
