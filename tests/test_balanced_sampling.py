"""Class-balanced sampling: the input pipeline applies records' class_weights.json by rejection.

Reference: with sizes n_c and acceptance probabilities w_c, a label's share of the stream is
n_c * w_c / sum(n * w), independent of the pipeline's code.
"""
import json

import numpy as np
from PIL import Image
import pytest

from input_pipeline import pipeline
from input_pipeline import records
from input_pipeline import tokenizer as tokenizer_lib
from input_pipeline.catalogue import CatalogueRow

SIZES = {"big": 60, "mid": 15, "small": 3}


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("balanced")
  rows = []
  for k, (label, size) in enumerate(SIZES.items()):
    for i in range(size):
      path = root / f"{label}_{i}.png"
      Image.new("RGB", (8, 8), (40 * k, 5 * i % 255, 100)).save(path)
      rows.append(CatalogueRow(id=f"{label}_{i}", image_path=str(path), title=f"{label} item", label=label,
                               kind="doc", split="train"))
  tokenizer = tokenizer_lib.TitleTokenizer.train([r.title for r in rows], vocab_size=50)
  out = root / "records"
  records.write_records(rows, out, tokenizer=tokenizer, max_title_len=8, num_shards=2, progress=False)
  return out


def _label_counts(ds, batches: int) -> tuple[np.ndarray, list[bytes]]:
  labels, ids = [], []
  for batch in ds.take(batches).as_numpy_iterator():
    labels.append(batch["label"])
    ids += list(batch["id"])
  return np.bincount(np.concatenate(labels), minlength=len(SIZES)), ids


def _dataset(record_dir, class_weights, seed=0, skip=0):
  return pipeline.make_dataset(record_dir, "train", batch_size=50, preprocess="decode|value_range(-1, 1)",
                               shuffle=True, repeat=True, seed=seed, shuffle_buffer=100,
                               class_weights=class_weights, skip_examples=skip)


def test_weights_file_shapes_the_stream(record_dir):
  label_ids = json.loads((record_dir / records.LABELS_FILE).read_text())["train"]
  assert pipeline.read_class_weights(record_dir, "train") is None  # No file: uniform over examples.
  n = np.array([SIZES[label] for label in sorted(label_ids, key=label_ids.get)], float)
  w = n ** -0.5 / (n ** -0.5).max()
  (record_dir / pipeline.CLASS_WEIGHTS_FILE).write_text(json.dumps(
      {"weights": {label: float(w[i]) for label, i in label_ids.items()}}))
  weights = pipeline.read_class_weights(record_dir, "train")
  assert weights == pytest.approx(list(w))
  counts, ids = _label_counts(_dataset(record_dir, weights), batches=80)
  expected = n * w / (n * w).sum()
  assert counts / counts.sum() == pytest.approx(expected, abs=0.03), (counts / counts.sum(), expected)
  uniform, _ = _label_counts(_dataset(record_dir, None), batches=80)
  assert uniform / uniform.sum() == pytest.approx(n / n.sum(), abs=0.03)
  # Deterministic in the seed, and a resumed stream (skip) continues exactly.
  again, ids_again = _label_counts(_dataset(record_dir, weights), batches=80)
  assert ids == ids_again
  _, resumed = _label_counts(_dataset(record_dir, weights, skip=50 * 30), batches=10)
  assert resumed == ids[50 * 30:50 * 40]
  _, other_seed = _label_counts(_dataset(record_dir, weights, seed=1), batches=80)
  assert other_seed != ids


def test_invalid_weight_names_the_file(record_dir):
  path = record_dir / pipeline.CLASS_WEIGHTS_FILE
  path.write_text(json.dumps({"weights": {"big": 0.0}}))
  with pytest.raises(ValueError, match="class_weights.json.*big"):
    pipeline.read_class_weights(record_dir, "train")
  path.unlink()
