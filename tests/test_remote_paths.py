"""A run whose workdir is a URL: TensorFlow's in-memory ram:// stands in for a pod's gs:// bucket.

What each layer supports (checked here): tf.io.gfile (oclear_jax.paths, TFRecordWriter,
tf.summary) serves ram:// and gs://; etils.epath knows gs:// but not ram://; orbax's arrays go
through tensorstore, whose drivers are file and gcs only, so a ram:// checkpoint would land in a
local folder named `ram:`. The run below sends orbax's folders to a local directory (what a gs://
workdir does not need) and ScaNN's index off (it serializes to local files); all else is under ram://.
"""
import json
import os

import pytest
import tensorflow as tf

from configs import tiny
from oclear_jax import checkpoint as checkpoint_lib
from oclear_jax import paths
from oclear_jax import trainer

WORKDIR = "ram://remote_run"


def test_resolve_keeps_urls_and_makes_local_paths_absolute():
  assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
  assert paths.resolve("ram://x/y") == "ram://x/y"
  assert paths.resolve("runs/a") == os.path.join(os.getcwd(), "runs/a")
  assert paths.is_remote("gs://b") and not paths.is_remote("/tmp/gs:/b")


def test_paths_round_trip_through_ram():
  path = paths.join("ram://unit", "eval", "step_1.json")
  paths.makedirs(os.path.dirname(path))
  with paths.open(path, "w") as f:
    f.write("{}")
  paths.replace(path, path + ".moved")
  assert paths.listdir("ram://unit/eval") == ["step_1.json.moved"]


@pytest.fixture(scope="module")
def ram_run(tmp_path_factory):
  """4 steps of the tiny config with a ram:// workdir; orbax's folders mapped to a local one."""
  local = tmp_path_factory.mktemp("orbax")
  catalogue = tmp_path_factory.mktemp("catalogue")  # the synthetic generator writes local images
  config = tiny.get_config()
  config.mesh.shape = (4, 2)
  config.train.update(num_steps=4, checkpoint_every=4, log_every=2)
  config.data.root = str(catalogue)
  config.eval.scann = False
  before = sorted(os.listdir(os.getcwd()))
  original = checkpoint_lib._resolve  # pylint: disable=protected-access
  to_local = lambda d: str(local / os.fspath(d).split("://", 1)[1]) if paths.is_remote(d) else original(d)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint_lib, "_resolve", to_local)
    result = trainer.train_and_evaluate(config, WORKDIR, progress=False)
  return result, local, before


def test_run_writes_its_files_under_the_url(ram_run):
  result, local, _ = ram_run
  assert result["final_step"] == 4 and 4 in result["eval"]
  for name in ("config.json", "metrics.jsonl", "records/records.json", "records/labels.json",
               "records/catalogue_counts.json", "eval/step_0.json", "eval/step_4.json",
               "recall_at_k.png", "contact_sheet.png"):
    assert tf.io.gfile.exists(f"{WORKDIR}/{name}"), name
  assert tf.io.gfile.glob(f"{WORKDIR}/records/*.tfrecord*")
  assert tf.io.gfile.glob(f"{WORKDIR}/tensorboard/events.out.tfevents.*")
  assert "4" in os.listdir(local / "remote_run" / "checkpoints")


def test_nothing_lands_on_local_disk_under_the_scheme(ram_run):
  _, _, before = ram_run
  assert sorted(os.listdir(os.getcwd())) == before
  assert not os.path.exists("ram:") and not os.path.exists("gs:")


def test_saved_config_is_read_back_from_the_url(ram_run):
  """index/search/embed run on the config a training run saved: here, under ram://."""
  from oclear_jax import inference  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(f"{WORKDIR}/config.json") as f:
    saved = json.load(f)
  config = inference.load_run_config(WORKDIR)
  assert config.train.num_steps == saved["train"]["num_steps"] == 4
  assert list(config.mesh.shape) == list(saved["mesh"]["shape"]) == [4, 2]
