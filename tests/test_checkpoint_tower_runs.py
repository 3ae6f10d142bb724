"""A tiny CLIP-format checkpoint end to end on configs/tiny.py sizes: train (frozen on cached tower features,
and partly fine-tuned on records) -> embed -> index -> search -> evaluate, with and without a run."""
import csv
import io
import os
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import tiny
from oclear_jax.commands import embed as embed_command
from oclear_jax.commands import evaluate as evaluate_command
from oclear_jax.commands import search as search_command
from oclear_jax.features import feature_cache
from oclear_jax.weights import tower_loading
from oclear_jax.train import trainer
import trained_state

CLIP = "hf:" + str(pathlib.Path(__file__).parent / "data" / "towers" / "clip")


def clip_config(*, frozen: bool):
  config = tiny.get_config()
  config.model.update(dict(image_tower=CLIP, text_tower=CLIP, image_pretrained=True, text_pretrained=True,
                           freeze_text_tower=True, freeze_image_tower=frozen, image_trainable_from=0 if frozen else 1,
                           head="identity_linear", embed_dim=12, fusion="gated"))  # 12: CLIP's joint space
  config.data.tokenizer = CLIP
  if frozen:  # cached tower features: images load as the feature cache loads them
    config.data.update(input="tower_features", balanced_sampling=False,
                       train_preprocess="decode|resize(32)|value_range(-1, 1)")
  config.train.update(num_steps=4, checkpoint_every=4, log_every=2)
  config.eval.update(every=0, at_start=False, contact_sheet_queries=0, scann=False)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for name, frozen in (("frozen", True), ("partly_fine_tuned", False)):
    workdir = str(tmp_path_factory.mktemp(name))
    trainer.train_and_evaluate(clip_config(frozen=frozen), workdir, progress=False)
    out[name] = workdir
  return out


def _image_params(config, workdir):
  _, state, step = trained_state.restore_trained_state(config, workdir)
  assert step == 4
  trained = state["params"]["encoder"]["image_encoder"]
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.meta.unbox(trained))
  return jax.tree.map(np.asarray, trained), tower_loading.load_tower(CLIP, like, "image")


def test_frozen_tower_stays_the_checkpoint_and_partial_fine_tuning_moves_only_later_blocks(runs):
  trained, loaded = _image_params(clip_config(frozen=True), runs["frozen"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), trained, loaded)
  trained, loaded = _image_params(clip_config(frozen=False), runs["partly_fine_tuned"])
  for frozen in ("patch_embed", "pos_embed", "cls_token", "ln_pre", "block0"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), trained[frozen], loaded[frozen])
  moved = [k for k in ("block1", "ln_final", "proj")
           if any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained[k]), jax.tree.leaves(loaded[k])))]
  assert moved == ["block1", "ln_final", "proj"]


def test_embed_index_search_and_evaluate(runs, tmp_path):
  workdir = runs["partly_fine_tuned"]
  config = clip_config(frozen=False)
  csv_path = os.path.join(workdir, "catalogue", "catalogue.csv")
  manifest = embed_command.run(config, workdir, csv_path, str(tmp_path / "emb"), progress=False, out=io.StringIO())
  documents = np.load(tmp_path / "emb" / "documents.npz")["emb"]
  assert documents.shape[1] == 12 and manifest["counts"]["embedded"] == len(documents)
  np.testing.assert_allclose(np.linalg.norm(documents, axis=1), 1.0, atol=1e-5)

  built = search_command.build_index(workdir, progress=False, out=io.StringIO())
  assert built["num_documents"] > 0
  with open(csv_path, encoding="utf-8") as f:
    image = os.path.join(workdir, "catalogue", next(csv.DictReader(f))["image"])
  payload = search_command.search(workdir, [image], top_k=3, output_format="json", out=io.StringIO())
  assert len(payload["queries"][0]["results"]) == 3

  result = evaluate_command.run(config, workdir, None, progress=False, out=io.StringIO())
  names = [row["name"] for row in result["rows"]]
  assert names[0] == "frozen pretrained (pooled, cosine)" and "trained (step 4)" in names
  assert 0.0 <= result["rows"][1]["metrics"]["recall@1"] <= 1.0


def test_evaluate_without_a_run_scores_the_checkpoints_own_features(runs, tmp_path):
  """The frozen row with no workdir: the CLIP tower's projected pooled features, cosine, as the feature cache
  computes them; labels planted in groups of three, every row a query of the others (recall@1 by hand)."""
  root = os.path.join(runs["frozen"], "catalogue")
  with open(os.path.join(root, "catalogue.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))[:60]
  csv_path = tmp_path / "planted.csv"
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "image", "title", "label"])
    for i, r in enumerate(rows):
      writer.writerow([f"p{i}", os.path.join(root, r["image"]), r["title"], f"g{i // 3}"])
  config = clip_config(frozen=True)
  config.model.fusion = "image_only"
  config.data.columns.update(dict(kind="", split=""))
  result = evaluate_command.run(config, None, str(csv_path), output=str(tmp_path / "out"), progress=False,
                                out=io.StringIO())
  assert [row["name"] for row in result["rows"]] == ["frozen pretrained (pooled, cosine)"]
  paths = [os.path.join(root, r["image"]) for r in rows]
  pooled = feature_cache.extract_features(paths, image_size=32, progress=False, tower=CLIP)["pooled"]
  unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  scores = unit @ unit.T
  np.fill_diagonal(scores, -np.inf)
  labels = np.arange(len(rows)) // 3
  want = float(np.mean(labels[np.argmax(scores, axis=1)] == labels))
  assert result["rows"][0]["metrics"]["recall@1"] == pytest.approx(want, abs=1e-6)


def test_embed_without_a_run_gives_the_checkpoints_unit_features(runs, tmp_path):
  """--mode=embed with no workdir: the initial model over the loaded tower; with the identity head a query is
  the tower's own pooled (projected) feature, normalised."""
  config = clip_config(frozen=True)
  config.model.fusion = "image_only"
  config.data.tokenizer = ""  # image_only: no titles read; data.input stays tower_features (the cache's image loader)
  csv_path = os.path.join(runs["frozen"], "catalogue", "catalogue.csv")
  manifest = embed_command.run(config, None, csv_path, str(tmp_path / "emb"), progress=False, out=io.StringIO())
  queries = np.load(tmp_path / "emb" / "queries.npz")["emb"]
  with open(csv_path, encoding="utf-8") as f:
    paths = [os.path.join(runs["frozen"], "catalogue", r["image"]) for r in csv.DictReader(f)]
  pooled = feature_cache.extract_features(paths, image_size=32, progress=False, tower=CLIP)["pooled"]
  assert manifest["checkpoint_step"] == -1 and len(queries) == len(paths)
  np.testing.assert_allclose(queries, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-5)
