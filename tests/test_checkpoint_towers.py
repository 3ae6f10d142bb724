"""Checkpoint towers (CLIP, SigLIP, DINOv2; Hugging Face folders and big_vision .npz) against transformers' outputs.

tests/data/towers/ is written by tools/make_tower_goldens.py (torch only there): tiny random-initialised
models with every parameter perturbed, and the PyTorch reference outputs for fixed images and titles.
"""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input_pipeline import checkpoint_tokenizer
from oclear_jax.models import checkpoint_towers
from oclear_jax.weights import tower_loading

DATA = pathlib.Path(__file__).parent / "data" / "towers"
GOLDEN = np.load(DATA / "golden.npz")
TITLES = [str(t) for t in GOLDEN["titles"]]
MAX_LEN = int(GOLDEN["max_len"])


def loaded_tower(spec: str, side: str, example: np.ndarray):
  arch = checkpoint_towers.describe(spec, side)
  tower = (checkpoint_towers.image_tower if side == "image" else checkpoint_towers.text_tower)(arch)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: tower.init(jax.random.key(0), jnp.asarray(example)))["params"])
  params = tower_loading.load_tower(spec, shapes, side)
  return tower, jax.tree.map(jnp.asarray, params)


def run_image(spec: str, images: np.ndarray):
  x = images.astype(np.float32) / 127.5 - 1.0  # what value_range(-1, 1) feeds every image tower
  tower, params = loaded_tower(spec, "image", x)
  return [np.asarray(o) for o in tower.apply({"params": params}, jnp.asarray(x))]


@pytest.mark.parametrize("spec,family", [("hf:clip", "clip"), ("hf:siglip", "siglip"), ("hf:dinov2", "dinov2"),
                                         ("big_vision:siglip_big_vision.npz", "siglip")])
def test_image_tower_equals_reference(spec, family):
  scheme, path = spec.split(":")
  tokens, pooled = run_image(f"{scheme}:{DATA / path}", GOLDEN["images"])
  np.testing.assert_allclose(pooled, GOLDEN[f"{family}_image_pooled"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(tokens, GOLDEN[f"{family}_image_tokens"], atol=1e-4, rtol=0)
  assert np.abs(pooled).max() > 0.1  # not a degenerate reference


def test_position_grid_resized_bilinearly_at_another_image_size():
  _, pooled = run_image(f"hf:{DATA / 'siglip'}", GOLDEN["images48"])  # 4x4 grid -> 6x6
  np.testing.assert_allclose(pooled, GOLDEN["siglip_image_48_pooled"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec,family", [("hf:clip", "clip"), ("hf:siglip", "siglip"),
                                         ("big_vision:siglip_big_vision.npz", "siglip")])
def test_text_tower_and_tokenizer_equal_reference(spec, family):
  scheme, path = spec.split(":")
  tokenizer = checkpoint_tokenizer.CheckpointTitleTokenizer(DATA / family)
  ids = tokenizer.encode_batch(TITLES, MAX_LEN)
  reference = GOLDEN[f"{family}_ids"]
  real = ids > 0
  np.testing.assert_array_equal(ids[real] - checkpoint_tokenizer.ID_OFFSET, reference[real])
  if family == "clip":  # the reference pads with its own (end) id where our rows hold 0
    np.testing.assert_array_equal(real, GOLDEN["clip_mask"].astype(bool))
  assert (reference == 0).any() if family == "clip" else True  # '!' is CLIP's id 0: the offset is exercised
  tower, params = loaded_tower(f"{scheme}:{DATA / path}", "text", ids)
  tokens, pooled, mask = (np.asarray(o) for o in tower.apply({"params": params}, jnp.asarray(ids)))
  np.testing.assert_array_equal(mask, real)
  np.testing.assert_allclose(pooled, GOLDEN[f"{family}_text_pooled"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(tokens[real], GOLDEN[f"{family}_text_tokens"][real], atol=1e-4, rtol=0)


def test_tokenizer_round_trips_through_the_records_file(tmp_path):
  from input_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = checkpoint_tokenizer.CheckpointTitleTokenizer(DATA / "siglip")
  tokenizer.save(tmp_path)
  again = tokenizer_lib.TitleTokenizer.load(tmp_path / "tokenizer.json")
  np.testing.assert_array_equal(again.encode_batch(TITLES, 8), tokenizer.encode_batch(TITLES, 8))
  assert again.special_ids == tokenizer.special_ids and again.vocab_size == tokenizer.vocab_size


# == Full-size architectures: exactly the public parameter counts =================================
FULL = {"clip_b16": ("image", "text"), "siglip_b16": ("image", "text"), "siglip_so400m": ("image", "text"),
        "dinov2_b14": ("image",)}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_parameter_count_and_layout(name):
  """Our towers of the public config hold exactly the public model's parameters, less the tensors no forward
  pass reads (named in hf_layout.UNUSED); every public tensor maps onto a parameter of the right shape."""
  from oclear_jax.weights import checkpoint_params, hf_layout  # pylint: disable=g-import-not-at-top
  folder = DATA / "full" / name
  public = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]
  shapes = {k: jax.ShapeDtypeStruct(tuple(v), jnp.float32) for k, v in public["shapes"].items()}
  ours = 0
  for side in FULL[name]:
    arch = checkpoint_towers.describe(f"hf:{folder}", side)
    tower = (checkpoint_towers.image_tower if side == "image" else checkpoint_towers.text_tower)(arch)
    example = (jnp.zeros((1, arch.image_size, arch.image_size, 3)) if side == "image"
               else jnp.ones((1, arch.fields["max_len"]), jnp.int32))
    like = nn.meta.unbox(jax.eval_shape(lambda: tower.init(jax.random.key(0), example))["params"])
    problems = {}

    def mapped(tensors, arch=arch, problems=problems):
      tree, found, _ = checkpoint_params.map_tensors(arch, tensors)
      problems.update(found)
      return tree

    tree = jax.eval_shape(mapped, shapes)
    tower_loading.check_same_structure(tree, like, what=name, file_problems=problems)
    ours += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(like))
  unused = sum(int(np.prod(s)) for k, s in public["shapes"].items() if k in hf_layout.UNUSED)
  parameters_unused = sum(int(np.prod(s)) for k, s in public["shapes"].items()
                          if k in hf_layout.UNUSED and not k.endswith("position_ids"))
  assert ours == public["num_parameters"] - parameters_unused, (ours, public["num_parameters"], unused)


# == Wrong files: one error naming the keys ======================================================
def _copy_folder(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def _rewrite(folder: pathlib.Path, edit) -> None:
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(str(folder / "model.safetensors"))
  save_file(edit(dict(tensors)), str(folder / "model.safetensors"))


def _load_error(folder: pathlib.Path, side: str = "image") -> str:
  example = GOLDEN["images"].astype(np.float32) if side == "image" else np.ones((1, MAX_LEN), np.int32)
  with pytest.raises(ValueError) as err:
    loaded_tower(f"hf:{folder}", side, example)
  return str(err.value)


def test_missing_extra_and_misshaped_tensors_are_named_in_one_error(tmp_path):
  folder = _copy_folder(DATA / "clip", tmp_path / "broken")

  def edit(t):
    del t["vision_model.encoder.layers.1.mlp.fc2.bias"]
    t["vision_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((16, 17), np.float32)
    t["vision_model.extra.weight"] = np.zeros((3,), np.float32)
    return t

  _rewrite(folder, edit)
  message = _load_error(folder)
  for key in ("vision_model.encoder.layers.1.mlp.fc2.bias", "vision_model.encoder.layers.0.self_attn.q_proj.weight",
              "vision_model.extra.weight"):
    assert key in message, message
  assert message.count("\n") == 0


def test_another_familys_weights_fail_naming_the_keys(tmp_path):
  folder = _copy_folder(DATA / "siglip", tmp_path / "mixed")
  (folder / "model.safetensors").write_bytes((DATA / "dinov2" / "model.safetensors").read_bytes())
  message = _load_error(folder)
  assert "'embeddings.patch_embedding.weight'" in message and "'embeddings.cls_token'" in message, message


def test_text_only_checkpoint_as_image_tower_is_refused(tmp_path):
  from transformers import CLIPTextConfig  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "text_only"
  CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
  with pytest.raises(ValueError, match="has no image tower"):
    checkpoint_towers.describe(f"hf:{folder}", "image")


def test_single_tower_sharded_folder_without_prefix_loads(tmp_path):
  """transformers 5 writes CLIPVisionModel without the 'vision_model.' prefix; big checkpoints come in shards."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "vision_only"
  folder.mkdir()
  CLIPConfig.from_pretrained(DATA / "clip").vision_config.save_pretrained(folder)
  (folder / "preprocessor_config.json").write_bytes((DATA / "clip" / "preprocessor_config.json").read_bytes())
  tensors = {k.removeprefix("vision_model."): v for k, v in load_file(str(DATA / "clip" / "model.safetensors")).items()
             if k.startswith("vision_model.")}
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(folder / shard))
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
  tokens, pooled = run_image(f"hf:{folder}", GOLDEN["images"])
  np.testing.assert_allclose(tokens, GOLDEN["clip_image_tokens"], atol=1e-4, rtol=0)
  assert pooled.shape[-1] == 16  # no projection in a CLIPVisionModel: the post-LN class token


def test_bfloat16_and_remat_keep_the_loaded_tower():
  """model.dtype / model.remat reach a checkpoint tower: remat leaves the gradients as they were, bf16 stays near f32."""
  x = jnp.asarray(GOLDEN["images"].astype(np.float32) / 127.5 - 1.0)
  tower, params = loaded_tower(f"hf:{DATA / 'clip'}", "image", np.asarray(x))
  loss = lambda t: jax.grad(lambda p: jnp.sum(t.apply({"params": p}, x)[1] ** 2))(params)
  remat = tower.clone(remat="blocks")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), loss(tower), loss(remat))
  bf16 = tower.clone(dtype=jnp.bfloat16)
  pooled16 = np.asarray(bf16.apply({"params": params}, x)[1])
  assert pooled16.dtype == np.float32
  np.testing.assert_allclose(pooled16, GOLDEN["clip_image_pooled"], atol=0.1 * np.abs(GOLDEN["clip_image_pooled"]).max())


def test_config_names_the_tokenizer_a_checkpoint_text_tower_needs():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from oclear_jax import config_schema  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  spec = f"hf:{DATA / 'clip'}"
  config.model.update(dict(image_tower=spec, text_tower=spec, image_pretrained=True, text_pretrained=True))
  with pytest.raises(ValueError, match=f"set config.data.tokenizer='{spec}'"):
    config_schema.validate(config)
  config.data.tokenizer = spec
  config_schema.validate(config)
  config.data.input = "trunk_activations"
  config.model.image_trainable_from = 1
  with pytest.raises(ValueError, match="trains EfficientNet-Lite0 from block"):
    config_schema.validate(config)


def test_a_bucket_checkpoint_is_copied_once_and_loads(tmp_path, monkeypatch):
  """ram:// (TensorFlow's in-memory filesystem) stands in for gs://: the folder comes down through paths.py."""
  from input_pipeline import paths  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("OCLEAR_CHECKPOINT_CACHE", str(tmp_path / "cache"))
  paths.copy_tree(str(DATA / "dinov2"), "ram://towers_test/dinov2")
  tokens, pooled = run_image("hf:ram://towers_test/dinov2", GOLDEN["images"])
  np.testing.assert_allclose(pooled, GOLDEN["dinov2_image_pooled"], atol=1e-4, rtol=0)
  assert len(list((tmp_path / "cache").rglob("model.safetensors"))) == 1
