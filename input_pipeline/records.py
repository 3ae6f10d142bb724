"""Writes catalogue rows as sharded TFRecords of tf.train.Examples.

Layout of a record directory:
  {split}-{i:05d}-of-{n:05d}.tfrecord  examples: id, image (JPEG), title, title_tokens,
                                       label, category (the label's name), kind (0 doc, 1 query)
  {split}.index.npy  per example of the split, in write order (example j is in shard j % n): its
                  shard, byte offset, length and label, so a host reads any example by index
                  (`input_pipeline.random_access`) instead of streaming every file
  dataset_info.json, features.json  TFDS metadata: `tfds.builder_from_directory(dir)` loads the
                  records as a TFDS dataset (`input_pipeline.tfds_metadata`)
  labels.json     {"train": {label: int}, "eval": {label: int}[, "val": ...]}, each sorted by label
  skipped.jsonl   one line per row whose image could not be used, with the reason
  tokenizer.json  the tokenizer that made title_tokens
  records.json    summary and fingerprint; written last, so its presence means "complete"

Images are re-encoded once here (any mode to RGB, optionally shrunk) so that the
training input pipeline only ever sees small, clean RGB JPEGs.
"""

import collections
import concurrent.futures
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import tempfile
import warnings
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps
import tensorflow as tf
import tqdm

from input_pipeline import tfds_metadata
from input_pipeline import paths  # a leaf module (no jax): URLs and local paths alike
from input_pipeline.catalogue import CatalogueRow
from input_pipeline.tokenizer import TitleTokenizer

FORMAT_VERSION = 2  # 2: a category feature, the per-split index, TFDS metadata
KIND_IDS = {"doc": 0, "query": 1}
SUMMARY_FILE = "records.json"
LABELS_FILE = "labels.json"
SKIPPED_FILE = "skipped.jsonl"
TOKENIZER_FILE = "tokenizer.json"
# data.max_image_pixels' default: a larger image is skipped ("too_large") before it is decoded.
MAX_IMAGE_PIXELS = 50_000_000
# Records are written in a fixed shuffled order so that shuffle buffers downstream see
# mixed classes, not the catalogue's (often class-sorted) CSV order.
_WRITE_ORDER_SEED = 0
# TFRecord framing around each serialized example: u64 length, u32 crc of it, data, u32 crc of data.
RECORD_HEADER_BYTES = 12
RECORD_FOOTER_BYTES = 4
INDEX_DTYPE = np.dtype([("shard", np.uint32), ("offset", np.uint64), ("length", np.uint32), ("label", np.int32)])


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def index_name(split: str) -> str:
  return f"{split}.index.npy"


def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode to RGB; transparency goes onto white, the usual catalogue backdrop."""
  image = ImageOps.exif_transpose(image)
  if image.mode == "RGB":
    return image
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(backdrop, rgba).convert("RGB")
  return image.convert("RGB")


def open_bounded(file, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
  """`Image.open`, refusing (ValueError "too_large: ...") an image of more than `max_pixels` before decoding it.

  PIL reads only the header here. Our limit replaces PIL's own decompression-bomb warning (above
  ~89 MP) and error (above twice that), so every loader skips a huge image for the same reason.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      image = Image.open(file)
    except Image.DecompressionBombError as e:
      raise ValueError(f"too_large: {e}") from e
  if max_pixels and image.width * image.height > max_pixels:
    image.close()
    raise ValueError(f"too_large: {image.width}x{image.height} = {image.width * image.height / 1e6:.0f} MP, "
                     f"above data.max_image_pixels={max_pixels}")
  return image


def encode_image(path: str, stored_image_size: Optional[int],
                 max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Optional[bytes], str]:
  """Returns (JPEG bytes, "") or (None, reason); never raises on a bad file."""
  try:
    if not paths.exists(path):
      return None, "missing"
    data = paths.read_bytes(path)  # a local file or a URL (gs://bucket/images/...)
    if not data:
      return None, "empty_file"
    with open_bounded(io.BytesIO(data), max_pixels) as image:
      image.load()  # Forces a full decode so truncation shows up here, not in training.
      image = _to_rgb(image)
      if stored_image_size:
        image.thumbnail((stored_image_size, stored_image_size), Image.Resampling.BICUBIC)
      buffer = io.BytesIO()
      image.save(buffer, format="JPEG", quality=95)
      return buffer.getvalue(), ""
  except Image.UnidentifiedImageError:
    return None, "not_an_image"
  except (OSError, SyntaxError, ValueError) as e:
    if str(e).startswith("too_large: "):
      return None, str(e)
    return None, "truncated" if "truncated" in str(e) else f"corrupt: {type(e).__name__}: {e}"
  except Exception as e:  # pylint: disable=broad-except  # A bad file must never stop the run.
    return None, f"unreadable: {type(e).__name__}: {e}"


def fingerprint(rows: Sequence[CatalogueRow], tokenizer: TitleTokenizer,
                **settings) -> str:
  """Hash of every input that changes the records: rows, image files, tokenizer, settings."""
  h = hashlib.sha256()
  h.update(json.dumps({"format_version": FORMAT_VERSION, **settings}, sort_keys=True).encode())
  h.update(hashlib.sha256(tokenizer.to_json().encode()).digest())
  for row in rows:
    stat = paths.size_and_mtime(row.image_path)
    h.update(json.dumps([row.id, row.image_path, row.title, row.label, row.kind,
                         row.split, stat]).encode("utf-8", errors="surrogatepass"))
  return h.hexdigest()


def _example(row: CatalogueRow, jpeg: bytes, tokens, label: int) -> bytes:
  def _bytes(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  def _ints(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

  return tf.train.Example(features=tf.train.Features(feature={
      "id": _bytes(row.id.encode("utf-8")),
      "image": _bytes(jpeg),
      "title": _bytes(row.title.encode("utf-8")),
      "title_tokens": _ints(int(t) for t in tokens),
      "label": _ints([label]),
      "category": _bytes(row.label.encode("utf-8")),
      "kind": _ints([KIND_IDS[row.kind]]),
  })).SerializeToString()


def write_records(rows: Sequence[CatalogueRow], out_dir: str | os.PathLike, *,
                  tokenizer: TitleTokenizer, max_title_len: int, num_shards: int,
                  stored_image_size: Optional[int] = None, progress: bool = True,
                  num_workers: Optional[int] = None, max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict:
  """Writes records for `rows` into out_dir and returns the records.json summary.

  Idempotent: when out_dir already holds records with the same fingerprint, nothing is
  rewritten. Work happens in a sibling temp dir renamed into place at the end, so a
  killed run never leaves a directory that looks complete.
  """
  out_dir = os.fspath(out_dir)
  settings = dict(max_title_len=max_title_len, num_shards=num_shards,
                  stored_image_size=stored_image_size)
  if max_image_pixels != MAX_IMAGE_PIXELS:  # (records made before the setting keep their fingerprint)
    settings["max_image_pixels"] = max_image_pixels
  digest = fingerprint(rows, tokenizer, **settings)
  summary_path = paths.join(out_dir, SUMMARY_FILE)
  if paths.exists(summary_path):
    with paths.open(summary_path) as f:
      existing = json.load(f)
    if existing.get("fingerprint") == digest:
      return existing
  tmp_dir = _staging_dir(out_dir)

  # Pass 1: decode and re-encode every image once (threads: PIL releases the GIL),
  # staging JPEG bytes on disk so memory stays flat for large catalogues.
  staged: list[tuple[CatalogueRow, int, int]] = []  # (row, offset, length)
  skipped = collections.Counter()
  with open(tmp_dir / "staging.bin", "wb") as staging, \
       open(tmp_dir / SKIPPED_FILE, "w", encoding="utf-8") as skipped_log, \
       concurrent.futures.ThreadPoolExecutor(num_workers or os.cpu_count() or 1) as pool:
    results = pool.map(lambda r: encode_image(r.image_path, stored_image_size, max_image_pixels), rows)
    for row, (jpeg, reason) in tqdm.tqdm(zip(rows, results), total=len(rows),
                                         desc="encode images", disable=not progress):
      if jpeg is None:
        short = reason.split(":")[0]
        skipped[short] += 1
        skipped_log.write(json.dumps({"id": row.id, "image": row.image_path,
                                      "reason": short, "detail": reason}) + "\n")
        continue
      staged.append((row, staging.tell(), len(jpeg)))
      staging.write(jpeg)

  # Label maps come from the rows that survived, so every train id has examples. A 'val' split
  # (training products held out for checkpoint selection, e.g. governance's product categories)
  # is written like the others when the catalogue has one.
  splits = ("train", "eval") + (("val",) if any(row.split == "val" for row, _, _ in staged) else ())
  label_maps = {}
  for split in splits:
    labels = sorted({row.label for row, _, _ in staged if row.split == split})
    label_maps[split] = {label: i for i, label in enumerate(labels)}
  (tmp_dir / LABELS_FILE).write_text(json.dumps(label_maps, indent=1, ensure_ascii=False))

  # Pass 2: tokenize titles and write shards round-robin in a fixed shuffled order.
  random.Random(_WRITE_ORDER_SEED).shuffle(staged)
  tokens = tokenizer.encode_batch([row.title for row, _, _ in staged], max_title_len)
  counts = {s: {"doc": 0, "query": 0, "total": 0} for s in splits}
  files, shard_lengths = {}, {}
  with open(tmp_dir / "staging.bin", "rb") as staging:
    for split in splits:
      indices = [i for i, (row, _, _) in enumerate(staged) if row.split == split]
      n = max(1, min(num_shards, len(indices)))
      files[split] = [shard_name(split, i, n) for i in range(n)]
      writers = [tf.io.TFRecordWriter(str(tmp_dir / f)) for f in files[split]]
      index = np.zeros(len(indices), INDEX_DTYPE)
      ends = [0] * n  # bytes written so far per shard: where its next record starts
      for j, i in enumerate(tqdm.tqdm(indices, desc=f"write {split}", disable=not progress)):
        row, offset, length = staged[i]
        staging.seek(offset)
        example = _example(row, staging.read(length), tokens[i], label_maps[split][row.label])
        writers[j % n].write(example)
        index[j] = (j % n, ends[j % n], len(example), label_maps[split][row.label])
        ends[j % n] += RECORD_HEADER_BYTES + len(example) + RECORD_FOOTER_BYTES
        counts[split][row.kind] += 1
        counts[split]["total"] += 1
      for w in writers:
        w.close()
      np.save(tmp_dir / index_name(split), index)
      shard_lengths[split] = [len(range(k, len(indices), n)) for k in range(n)]
  (tmp_dir / "staging.bin").unlink()
  tokenizer.save(tmp_dir / TOKENIZER_FILE)

  summary = {
      "fingerprint": digest, "format_version": FORMAT_VERSION, "counts": counts,
      "num_classes": {s: len(m) for s, m in label_maps.items()},
      "skipped": dict(skipped), "rows_in": len(rows), "files": files,
      "vocab_size": tokenizer.vocab_size,
      # [CLS], [SEP]: what the model must read as "no title" (101, 102 for a BERT vocabulary).
      "title_special_ids": list(tokenizer.special_ids), **settings,
  }
  tfds_metadata.write_metadata(tmp_dir, shard_lengths)
  (tmp_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
  _publish(tmp_dir, out_dir)
  return summary


def _staging_dir(out_dir: str) -> pathlib.Path:
  """A fresh local folder to write into: beside out_dir (one rename publishes it), or a temp folder
  when out_dir is a URL (gs://...), whose shards are then copied up (`_publish`)."""
  if paths.is_remote(out_dir):
    return pathlib.Path(tempfile.mkdtemp(prefix="oclear_records-"))
  tmp_dir = pathlib.Path(out_dir).parent / f".{pathlib.Path(out_dir).name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  tmp_dir.mkdir(parents=True)
  return tmp_dir


def _publish(tmp_dir: pathlib.Path, out_dir: str) -> None:
  """Puts the finished records at out_dir; records.json arrives last, so a partial copy never looks complete."""
  if paths.exists(out_dir):
    paths.rmtree(out_dir)
  if paths.is_remote(out_dir):
    paths.copy_tree(str(tmp_dir), out_dir, last=SUMMARY_FILE)
    shutil.rmtree(tmp_dir)
  else:
    tmp_dir.rename(out_dir)
