"""The index autotuner, the fastest exact search, one-off search depth and config overrides on a saved run.

Small arrays throughout (a few thousand x 32): the whole file runs in seconds.
"""
import json
import os
import types

from absl import flags
import numpy as np
import pytest

from oclear_jax import run_config
from oclear_jax import config_schema
from oclear_jax import main
from oclear_jax.retrieval import exact_search
from oclear_jax.retrieval import index_tuning
from oclear_jax.retrieval import recall_against_exact
from oclear_jax.retrieval import scann_search
from oclear_jax.commands import search as search_command
from oclear_jax.serving import gallery_index

from top_k_reference import numpy_top_k


def _clustered(rng, n, num_queries, d=32, clusters=100, noise=0.8):
  """(gallery, queries): unit vectors around clusters; queries are fresh draws, not gallery rows."""
  centres = rng.normal(size=(clusters, d))
  def draw(m):
    x = centres[rng.integers(0, clusters, m)] + noise * rng.normal(size=(m, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return draw(n), draw(num_queries)


@pytest.mark.parametrize("method", ["scann", "jax"])
@pytest.mark.parametrize("n,k,excluded", [(1500, 10, False), (1500, 10, True), (257, 100, False), (5, 8, True)])
def test_fastest_exact_equals_numpy_including_ties(method, n, k, excluded):
  rng = np.random.default_rng(n + k)
  # Small integers: f32 dot products are exact and scores tie often, so tie order is checked bit for bit
  # (ScaNN breaks ties arbitrarily, also at the cut of its top-k; see ScannIndex._search_exact).
  queries, gallery = (rng.integers(-1, 2, (m, 6)).astype(np.float32) for m in (29, n))
  exclude = (np.arange(29), np.arange(n)) if excluded else None
  scores, idx = exact_search.fastest_exact_top_k(queries, gallery, k, exclude=exclude, method=method)
  want_scores, want_idx = numpy_top_k(queries, gallery, k, exclude)
  assert idx.dtype == np.int32 and scores.dtype == np.float32
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(scores, want_scores.astype(np.float32))


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
  rng = np.random.default_rng(0)
  gallery, queries = _clustered(rng, 6000, 1000)  # 400 to tune on, 600 never seen (a steadier recall)
  tuned = index_tuning.tune(gallery, queries[:400], target_recall=0.9, build_budget_s=10, min_time_s=0,
                            exact_is_candidate=False, progress=False)
  directory = str(tmp_path_factory.mktemp("frontier"))
  return gallery, queries[400:], tuned, directory, index_tuning.write_frontier(tuned, directory)


def test_tuned_index_meets_the_target_on_held_out_queries(tuned_run):
  gallery, fresh, tuned, _, _ = tuned_run
  assert tuned.chosen["met"] and tuned.chosen["recall@10"] >= 0.9  # the check half, not used to choose
  assert "tree" in tuned.index.description and "tuned to recall@10 >= 0.9" in tuned.index.description
  # Queries the tuner never saw, searched with the stored depth (no arguments): still at the target.
  _, idx = tuned.index.search(fresh, 10)
  _, exact = exact_search.fastest_exact_top_k(fresh, gallery, 10)
  assert recall_against_exact(idx, exact) >= 0.87
  # The search-time sweep ran before any build knob changed, and build knobs were tried too.
  builds = [json.dumps(r["build"], sort_keys=True) for r in tuned.frontier if r["build"]]
  assert len(set(builds)) >= 2 and builds[0] == builds[1]
  assert {r["reorder"] for r in tuned.frontier if r["build"]} >= {40, 100}


def test_frontier_files_agree_with_the_chosen_setting(tuned_run, tmp_path):
  gallery, _, tuned, directory, (json_path, png_path) = tuned_run
  assert os.path.getsize(png_path) > 10_000
  with open(json_path, encoding="utf-8") as f:
    frontier = json.load(f)
  assert frontier["chosen"] == json.loads(json.dumps(tuned.chosen))
  assert len(frontier["settings"]) == len(tuned.frontier) and frontier["settings"][0]["setting"].startswith("exact")
  chosen = [r for r in frontier["settings"] if r["setting"] == frontier["chosen"]["setting"]]
  assert chosen and chosen[0]["check_recall"] == frontier["chosen"]["recall@10"]
  assert frontier["chosen"]["speedup_vs_exact"] == max(r["check_speedup"] for r in frontier["settings"][1:]
                                                       if r.get("check_recall", 0) >= 0.9)
  # The stored depth survives save/load: the loaded index searches with the chosen setting.
  tuned.index.save(tmp_path / "scann")
  loaded = scann_search.ScannIndex.load(tmp_path / "scann")
  assert (loaded.params["num_leaves_to_search"], loaded.params["reorder"]) == (
      chosen[0]["leaves_to_search"], chosen[0]["reorder"])
  assert loaded.description == tuned.index.description


def test_exact_is_chosen_when_nothing_approximate_meets_the_target():
  rng = np.random.default_rng(1)
  gallery, queries = _clustered(rng, 1200, 100, clusters=300, noise=2.0)
  # Re-scoring only AH's own top 10 (reorder 10) on near-uniform data cannot be exact: nothing approximate meets
  # recall 1.0 (a deeper reorder over every leaf could, and would then win on speed alone).
  tuned = index_tuning.tune(gallery, queries, target_recall=1.0, build_budget_s=0, min_time_s=0, reorders=(10,),
                            progress=False)
  approximate = [r for r in tuned.frontier if r["build"] is not None]
  assert approximate and max(r["recall@10"] for r in approximate) < 1.0
  assert tuned.index.params["mode"] == "brute_force" and tuned.chosen["recall@10"] == 1.0
  assert "exact" in tuned.chosen["setting"] and "tuned to recall@10 >= 1.0" in tuned.index.description


def test_search_depth_flags_change_the_result(tuned_run, tmp_path):
  gallery, fresh, tuned, _, _ = tuned_run
  _, exact = exact_search.fastest_exact_top_k(fresh, gallery, 5)
  ids = np.array([f"doc{i}".encode() for i in range(len(gallery))])
  index = types.SimpleNamespace(searcher=tuned.index, ids=ids, titles=ids, image_paths=np.full(len(ids), b""),
                                step=1, title_vectors=None)
  index.search = lambda *args, **kwargs: gallery_index.GalleryIndex.search(index, *args, **kwargs)

  def answer(**depth):
    payload = search_command._answer(str(tmp_path), config_schema.base_config(), index, ["q"] * len(fresh),
                                     [np.zeros((8, 8, 3), np.uint8)] * len(fresh), fresh, top_k=5,
                                     output_format="json", out=open(os.devnull, "w"), depth=depth)
    return payload, np.array([[int(r["id"][3:]) for r in q["results"]] for q in payload["queries"]])

  _, tuned_rows = answer()
  _, shallow = answer(leaves_to_search=1, reorder=5)
  deep_payload, deep = answer(leaves_to_search=10_000, reorder=500)  # every leaf: exact on this data
  assert recall_against_exact(deep, exact) >= 0.99
  assert recall_against_exact(shallow, exact) < recall_against_exact(tuned_rows, exact) - 0.05
  assert f"search {tuned.index.params['num_leaves']}," in deep_payload["searcher"]
  assert tuned.index.params["num_leaves_to_search"] < tuned.index.params["num_leaves"]  # the index is unchanged
  with pytest.raises(ValueError, match="--search.leaves=0"):
    search_command.search(str(tmp_path), ["x.jpg"], leaves_to_search=0)
  # The command line spells them --search.leaves / --search.reorder; 0 is refused by the flag itself.
  with pytest.raises(flags.IllegalFlagValueError):
    flags.FLAGS["search.leaves"].parse("0")
  assert flags.FLAGS["search.reorder"].default is None


def test_index_overrides_apply_to_the_saved_config_without_config_flag(tmp_path):
  config = config_schema.base_config()
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  argv = ["prog", "--mode=index", f"--workdir={tmp_path}", "--config.index.target_recall=0.9",
          "--config.index.exact_max_documents", "0"]
  kept, overrides = main.split_config_overrides(argv)
  assert kept == ["prog", "--mode=index", f"--workdir={tmp_path}"]
  loaded = main.apply_config_overrides(run_config.load(str(tmp_path)), overrides)
  assert (loaded.index.target_recall, loaded.index.exact_max_documents) == (0.9, 0)
  assert scann_search.params_from_config(loaded.index)["exact_max_documents"] == 0
  bad = main.apply_config_overrides(run_config.load(str(tmp_path)), ["--config.index.target_recall=1.5"])
  with pytest.raises(ValueError, match="target_recall=1.5 must lie in"):
    config_schema.validate(bad)
