"""The real-catalogue config reads the Myntra sample with no code change (skips when absent)."""
import json
import os

from configs import fashion
from input_pipeline import pipeline
from oclear_jax import run_data


def test_fashion_config_reads_200_real_rows(fashion_dir, tmp_path):
  config = fashion.get_config(str(fashion_dir))
  config.data.max_rows = 200
  config.data.num_shards = 2
  prepared = run_data.prepare_data(config.data, str(tmp_path), seed=config.seed, progress=False)
  summary = prepared.summary
  total = sum(split["total"] for split in summary["counts"].values())
  assert total + sum(summary["skipped"].values()) == 200
  assert prepared.num_classes > 1 and prepared.vocab_size > 10
  with open(os.path.join(prepared.records_dir, "labels.json"), encoding="utf-8") as f:
    labels = json.load(f)
  # Class-disjoint split: no articleType is both trained on and held out.
  assert not set(labels["train"]) & set(labels["eval"])
  batch = next(pipeline.make_train_dataset(prepared.records_dir, "train", global_batch_size=8,
                                           preprocess=config.data.train_preprocess, seed=0).as_numpy_iterator())
  assert batch["image"].shape == (8, 64, 64, 3) and batch["title_tokens"].shape == (8, config.data.max_title_len)
