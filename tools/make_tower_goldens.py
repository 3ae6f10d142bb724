r"""Writes tests/data/towers/: tiny random checkpoints of CLIP, SigLIP and DINOv2 and their reference outputs.

torch is needed here only (never by `make test`); run it from a separate environment:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors \
      numpy pillow sentencepiece protobuf
  /tmp/torchenv/bin/python tools/make_tower_goldens.py --out tests/data/towers

What it writes (a few hundred KB):
  clip/, siglip/, dinov2/: `save_pretrained` folders of tiny random CLIPModel, SiglipModel, Dinov2Model
    (config.json, model.safetensors, preprocessor_config.json, tokenizer files), every parameter
    perturbed (layer norms and layer scales too), so a loader that skips a tensor cannot pass;
  siglip_big_vision.npz: the tiny SigLIP in big_vision's parameter layout (img/, txt/, t, b);
  golden.npz: the images and titles, the reference tokenizers' ids, and per family the pooled and
    per-token outputs of transformers' PyTorch models (CLIP's tokens after its post_layernorm, as our
    tower returns them); `siglip_image_48`: the SigLIP image tower at 48 px with its position grid
    resized by torch's bilinear interpolation (align_corners=False): the reference for our resize;
  full/: config.json (+ preprocessor config, tokenizer) and a shard index (every tensor's name and shape, no shards) of the
    public CLIP ViT-B/16, SigLIP B/16-224, SigLIP So400m/14-384 and DINOv2 ViT-B/14, from meta-device
    models, for the parameter-count tests.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import sentencepiece as spm
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.core_model_loading import revert_weight_conversion

TITLES = ["Red cotton T-shirt for men", "Blue denim jeans, slim fit!", "", "Leather handbag with gold buckle",
          "!!! sale: 2 pairs of socks"]
IMAGE_SIZE, PATCH, MAX_LEN = 32, 8, 16
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


def perturb(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def images() -> np.ndarray:
  rng = np.random.default_rng(0)
  smooth = rng.uniform(0, 255, (3, 4, 4, 3))
  big = np.kron(smooth, np.ones((1, 8, 8, 1)))  # blocky images, plus noise
  return np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)


def pixels(imgs: np.ndarray, mean, std) -> torch.Tensor:
  x = (imgs.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def clip_tokenizer(folder: pathlib.Path) -> transformers.PreTrainedTokenizerBase:
  """A tiny byte-level BPE in CLIP's format: the 512 byte symbols, merges learned on the titles."""
  byte_chars = list(bytes_to_unicode().values())
  vocab = byte_chars + [c + "</w>" for c in byte_chars]
  words = [list(w[:-1]) + [w[-1] + "</w>"] for t in TITLES for w in t.lower().split() if w.isalpha()]
  merges = []
  for _ in range(40):
    counts: dict[tuple[str, str], int] = {}
    for w in words:
      for pair in zip(w, w[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    if not counts:
      break
    best = max(sorted(counts), key=counts.get)
    merges.append(best)
    vocab.append(best[0] + best[1])
    for w in words:
      i = 0
      while i < len(w) - 1:
        if (w[i], w[i + 1]) == best:
          w[i:i + 2] = [best[0] + best[1]]
        i += 1
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  # transformers 5: `vocab` / `merges` take the dict and pairs (a `vocab_file=` would be ignored silently).
  tok = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))},
                                   merges=[(a, b) for a, b in merges], model_max_length=MAX_LEN)
  tok.save_pretrained(folder)
  return transformers.AutoTokenizer.from_pretrained(folder)


def siglip_tokenizer(folder: pathlib.Path, scratch: pathlib.Path) -> transformers.PreTrainedTokenizerBase:
  """A tiny SentencePiece model with SigLIP's ids (<pad> 0, </s> 1, <unk> 2) and no normaliser table."""
  text = scratch / "titles.txt"
  text.write_text("\n".join(t.lower() for t in TITLES * 20 if t) + "\nthe a of and with for\n")
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(scratch / "spiece"), vocab_size=60,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 normalization_rule_name="identity", hard_vocab_limit=False)
  folder.mkdir(parents=True, exist_ok=True)
  shutil.copy(scratch / "spiece.model", folder / "spiece.model")
  tok = transformers.SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=MAX_LEN)
  tok.save_pretrained(folder)
  return transformers.AutoTokenizer.from_pretrained(folder)


def processor(folder: pathlib.Path, mean, std) -> None:
  (folder / "preprocessor_config.json").write_text(json.dumps(dict(
      do_normalize=True, do_rescale=True, rescale_factor=1 / 255, image_mean=mean, image_std=std,
      size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})))


def make_clip(out: pathlib.Path, golden: dict, imgs: np.ndarray) -> None:
  tok = clip_tokenizer(out / "clip")
  config = transformers.CLIPConfig(
      vision_config=dict(**TINY, image_size=IMAGE_SIZE, patch_size=PATCH),
      text_config=dict(**TINY, vocab_size=len(tok), max_position_embeddings=MAX_LEN,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
      projection_dim=12)
  torch.manual_seed(1)
  model = transformers.CLIPModel(config).eval()
  perturb(model, 1)
  model.save_pretrained(out / "clip")
  processor(out / "clip", CLIP_MEAN, CLIP_STD)
  with torch.no_grad():
    v = model.vision_model(pixel_values=pixels(imgs, CLIP_MEAN, CLIP_STD))
    golden["clip_image_tokens"] = model.vision_model.post_layernorm(v.last_hidden_state).numpy()
    golden["clip_image_pooled"] = model.visual_projection(v.pooler_output).numpy()
    enc = tok(TITLES, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    t = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    golden["clip_text_tokens"] = t.last_hidden_state.numpy()
    golden["clip_text_pooled"] = model.text_projection(t.pooler_output).numpy()
  golden["clip_ids"], golden["clip_mask"] = enc["input_ids"].numpy(), enc["attention_mask"].numpy()


def big_vision_siglip(model: transformers.SiglipModel) -> dict[str, np.ndarray]:
  """The tiny SigLIP's tensors under big_vision's names (its Flax layouts), as its .npz holds them."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  heads, out = TINY["num_attention_heads"], {}

  def dense(name, w, b):
    out[f"{name}/kernel"], out[f"{name}/bias"] = w.T, b

  def attention(name, q, k, v, o):  # each (weight, bias) in torch layout
    for part, (w, b) in zip(("query", "key", "value"), (q, k, v)):
      out[f"{name}/{part}/kernel"] = w.T.reshape(w.shape[1], heads, -1)
      out[f"{name}/{part}/bias"] = b.reshape(heads, -1)
    out[f"{name}/out/kernel"], out[f"{name}/out/bias"] = o[0].T.reshape(heads, -1, o[0].shape[0]), o[1]

  def norm(name, prefix):
    out[f"{name}/scale"], out[f"{name}/bias"] = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]

  for tower, enc in (("vision_model", "img/Transformer"), ("text_model", "txt/Encoder_0")):
    for i in range(TINY["num_hidden_layers"]):
      p, b = f"{tower}.encoder.layers.{i}", f"{enc}/encoderblock_{i}"
      norm(f"{b}/LayerNorm_0", f"{p}.layer_norm1")
      attention(f"{b}/MultiHeadDotProductAttention_0",
                *[(sd[f"{p}.self_attn.{n}_proj.weight"], sd[f"{p}.self_attn.{n}_proj.bias"]) for n in "qkv"],
                (sd[f"{p}.self_attn.out_proj.weight"], sd[f"{p}.self_attn.out_proj.bias"]))
      norm(f"{b}/LayerNorm_1", f"{p}.layer_norm2")
      dense(f"{b}/MlpBlock_0/Dense_0", sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])
      dense(f"{b}/MlpBlock_0/Dense_1", sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
  w = sd["vision_model.embeddings.patch_embedding.weight"]
  out["img/embedding/kernel"] = w.transpose(2, 3, 1, 0)
  out["img/embedding/bias"] = sd["vision_model.embeddings.patch_embedding.bias"]
  out["img/pos_embedding"] = sd["vision_model.embeddings.position_embedding.weight"][None]
  norm("img/Transformer/encoder_norm", "vision_model.post_layernorm")
  h = "vision_model.head"
  out["img/MAPHead_0/probe"] = sd[f"{h}.probe"]
  qw, kw, vw = np.split(sd[f"{h}.attention.in_proj_weight"], 3)
  qb, kb, vb = np.split(sd[f"{h}.attention.in_proj_bias"], 3)
  attention("img/MAPHead_0/MultiHeadDotProductAttention_0", (qw, qb), (kw, kb), (vw, vb),
            (sd[f"{h}.attention.out_proj.weight"], sd[f"{h}.attention.out_proj.bias"]))
  norm("img/MAPHead_0/LayerNorm_0", f"{h}.layernorm")
  dense("img/MAPHead_0/MlpBlock_0/Dense_0", sd[f"{h}.mlp.fc1.weight"], sd[f"{h}.mlp.fc1.bias"])
  dense("img/MAPHead_0/MlpBlock_0/Dense_1", sd[f"{h}.mlp.fc2.weight"], sd[f"{h}.mlp.fc2.bias"])
  out["txt/Embed_0/embedding"] = sd["text_model.embeddings.token_embedding.weight"]
  out["txt/pos_embedding"] = sd["text_model.embeddings.position_embedding.weight"][None]
  norm("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
  dense("txt/head", sd["text_model.head.weight"], sd["text_model.head.bias"])
  out["t"], out["b"] = sd["logit_scale"], sd["logit_bias"]
  return {f"params/{k}": np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def make_siglip(out: pathlib.Path, golden: dict, imgs: np.ndarray, scratch: pathlib.Path) -> None:
  tok = siglip_tokenizer(out / "siglip", scratch)
  config = transformers.SiglipConfig(
      vision_config=dict(**TINY, image_size=IMAGE_SIZE, patch_size=PATCH),
      text_config=dict(**TINY, vocab_size=len(tok), max_position_embeddings=MAX_LEN, projection_size=12,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
  torch.manual_seed(2)
  model = transformers.SiglipModel(config).eval()
  perturb(model, 2)
  model.save_pretrained(out / "siglip")
  processor(out / "siglip", [0.5] * 3, [0.5] * 3)
  np.savez(out / "siglip_big_vision.npz", **big_vision_siglip(model))
  with torch.no_grad():
    v = model.vision_model(pixel_values=pixels(imgs, [0.5] * 3, [0.5] * 3))
    golden["siglip_image_tokens"], golden["siglip_image_pooled"] = v.last_hidden_state.numpy(), v.pooler_output.numpy()
    enc = tok(TITLES, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    t = model.text_model(input_ids=enc["input_ids"])
    golden["siglip_text_tokens"], golden["siglip_text_pooled"] = t.last_hidden_state.numpy(), t.pooler_output.numpy()
    golden["siglip_ids"] = enc["input_ids"].numpy()
    # At 48 px: the 4x4 position grid resized to 6x6 bilinearly (align_corners=False) in a 48 px twin.
    big = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        **TINY, image_size=48, patch_size=PATCH)).eval()
    state = dict(model.vision_model.state_dict())
    pos = state["embeddings.position_embedding.weight"].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    pos = torch.nn.functional.interpolate(pos, size=(6, 6), mode="bilinear", align_corners=False)
    state["embeddings.position_embedding.weight"] = pos.permute(0, 2, 3, 1).reshape(36, -1)
    big.load_state_dict(state)
    imgs48 = np.kron(imgs, np.ones((1, 3, 3, 1), np.uint8))[:, ::2, ::2]
    golden["images48"] = imgs48
    golden["siglip_image_48_pooled"] = big(pixel_values=pixels(imgs48, [0.5] * 3, [0.5] * 3)).pooler_output.numpy()


def make_dinov2(out: pathlib.Path, golden: dict, imgs: np.ndarray) -> None:
  config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                     image_size=IMAGE_SIZE, patch_size=PATCH)
  torch.manual_seed(3)
  model = transformers.Dinov2Model(config).eval()
  perturb(model, 3)
  model.save_pretrained(out / "dinov2")
  processor(out / "dinov2", IMAGENET_MEAN, IMAGENET_STD)
  with torch.no_grad():
    o = model(pixel_values=pixels(imgs, IMAGENET_MEAN, IMAGENET_STD))
  golden["dinov2_image_tokens"], golden["dinov2_image_pooled"] = o.last_hidden_state.numpy(), o.pooler_output.numpy()


def full_size(out: pathlib.Path) -> None:
  """Public architectures, built on the meta device (no memory): config + every tensor's shape."""
  b16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
  so400m = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
  models = {
      "clip_b16": (transformers.CLIPModel, transformers.CLIPConfig(
          vision_config=dict(**b16, image_size=224, patch_size=16),
          text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                           max_position_embeddings=77, vocab_size=49408),
          projection_dim=512), "clip", (CLIP_MEAN, CLIP_STD)),
      "siglip_b16": (transformers.SiglipModel, transformers.SiglipConfig(
          vision_config=dict(**b16, image_size=224, patch_size=16),
          text_config=dict(**b16, vocab_size=32000, max_position_embeddings=64)), "siglip", ([0.5] * 3, [0.5] * 3)),
      "siglip_so400m": (transformers.SiglipModel, transformers.SiglipConfig(
          vision_config=dict(**so400m, image_size=384, patch_size=14),
          text_config=dict(**so400m, vocab_size=32000, max_position_embeddings=64, projection_size=1152)),
          "siglip", ([0.5] * 3, [0.5] * 3)),
      "dinov2_b14": (transformers.Dinov2Model, transformers.Dinov2Config(
          hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=518,
          patch_size=14), None, (IMAGENET_MEAN, IMAGENET_STD)),
  }
  for name, (cls, config, tokenizer, (mean, std)) in models.items():
    folder = out / "full" / name
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
      model = cls(config)
    config.save_pretrained(folder)
    # The names as save_pretrained writes them (transformers 5 renames some modules in memory, e.g. DINOv2's).
    saved = revert_weight_conversion(model, model.state_dict())
    shapes = {k: list(v.shape) for k, v in saved.items()}
    # The tensor names as a sharded folder lists them (the shards are not written), their shapes and the
    # public parameter count in its metadata.
    (folder / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"num_parameters": sum(p.numel() for p in model.parameters()), "shapes": shapes},
        "weight_map": {k: "absent.safetensors" for k in shapes}}, separators=(",", ":")))
    processor(folder, mean, std)
    if tokenizer:  # the text tower reads its pad and end ids from a tokenizer: the tiny one's files
      for f in (out / tokenizer).iterdir():
        if f.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "spiece.model"):
          shutil.copy(f, folder / f.name)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/data/towers")
  out = pathlib.Path(parser.parse_args().out)
  if out.exists():
    shutil.rmtree(out)
  scratch = out / "_scratch"
  scratch.mkdir(parents=True)
  imgs, golden = images(), {}
  make_clip(out, golden, imgs)
  make_siglip(out, golden, imgs, scratch)
  make_dinov2(out, golden, imgs)
  full_size(out)
  shutil.rmtree(scratch)
  np.savez_compressed(out / "golden.npz", images=imgs, titles=np.asarray(TITLES), max_len=MAX_LEN, **golden)
  total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
  print(f"wrote {out} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
  main()
