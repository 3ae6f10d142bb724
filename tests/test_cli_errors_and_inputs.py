"""Fail before work, once, in one line: config file errors, clean errors without an absl log line, images
above data.max_image_pixels skipped and counted before decoding, and the README's tiny command on a CPU.
"""
import os
import pathlib
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from input_pipeline import catalogue as catalogue_lib
from input_pipeline import images as images_lib
from input_pipeline import records as records_lib
from input_pipeline import tokenizer as tokenizer_lib
from oclear_jax import config_schema

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, env=None):
  env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
  return subprocess.run([sys.executable, "-m", "oclear_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def _one_error_line(proc) -> str:
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


CONFIG_FILES = {
    "missing file": (None, [], r"error: config file {path} not found"),
    "syntax error": ("def get_config(:\n", [], r"error: {path}:1: syntax error: "),
    "unknown key in the file": ("from configs import tiny\ndef get_config():\n  c = tiny.get_config()\n"
                                "  c.train.num_step = 5\n  return c\n", [],
                                r"config.train.num_step is not a config field \(did you mean num_steps\?\)"),
    "unknown key on the command line": ("from configs.tiny import get_config\n", ["--config.train.num_step=5"],
                                        r"unknown config key 'num_step' in --config.train.num_step=5 "
                                        r"\(did you mean num_steps\?\)"),
    "wrong type": ("from configs.tiny import get_config\n", ["--config.train.num_steps=many"],
                   r"--config.train.num_steps=many: invalid literal for int"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_a_config_file_error_is_one_line_naming_the_file_or_key_and_nothing_is_written(case, tmp_path):
  text, extra, expected = CONFIG_FILES[case]
  path = tmp_path / "my_config.py"
  if text is not None:
    path.write_text(text)
  proc = _main(f"--config={path}", f"--workdir={tmp_path / 'run'}", *extra)
  assert re.search(expected.format(path=re.escape(str(path))), _one_error_line(proc)), proc.stderr
  assert not (tmp_path / "run").exists()


def test_a_clean_error_is_printed_once_without_an_absl_log_line(tmp_path):
  line = _one_error_line(_main("--mode=index", f"--workdir={tmp_path / 'nothing'}"))
  assert "does not exist" in line


def _png_header_only(path: pathlib.Path, width: int, height: int) -> None:
  """A PNG whose header claims width x height (no pixel data): a decompression bomb, cheap to make."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                   + chunk(b"IEND", b""))


def test_images_above_the_pixel_limit_are_skipped_with_their_reason_before_decoding(tmp_path):
  _png_header_only(tmp_path / "bomb.png", 12000, 12000)  # 144 MP: above the 50 MP default
  _png_header_only(tmp_path / "huge.png", 40000, 40000)  # above PIL's own error limit too
  Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "ok.png")
  assert config_schema.base_config().data.max_image_pixels == records_lib.MAX_IMAGE_PIXELS
  for name in ("bomb.png", "huge.png"):
    jpeg, reason = records_lib.encode_image(str(tmp_path / name), 32)
    assert jpeg is None and reason.startswith("too_large: "), reason
  assert "12000x12000 = 144 MP, above data.max_image_pixels=50000000" in records_lib.encode_image(
      str(tmp_path / "bomb.png"), 32)[1]
  assert records_lib.encode_image(str(tmp_path / "ok.png"), 32)[0] is not None
  assert records_lib.encode_image(str(tmp_path / "ok.png"), 32, max_pixels=1000)[1].startswith("too_large")

  # embed and search (preprocess_image_files), both input paths, and prepare (write_records) alike.
  data = tiny.get_config().data
  files = [str(tmp_path / n) for n in ("ok.png", "bomb.png")]
  for kind in ("records", "tower_features"):
    data.input = kind
    _, kept, failed = images_lib.preprocess_image_files(files, data)
    assert kept == [0] and [(i, r.split(":")[0]) for i, r in failed] == [(1, "too_large")]
  rows = [catalogue_lib.CatalogueRow(id=n, image_path=str(tmp_path / f"{n}.png"), title="a shirt", label="l",
                                     kind="doc", split="train") for n in ("ok", "bomb")]
  summary = records_lib.write_records(rows, tmp_path / "records", tokenizer=tokenizer_lib.TitleTokenizer.train(
      ["a shirt"], vocab_size=50), max_title_len=8, num_shards=1, stored_image_size=32, progress=False)
  assert summary["skipped"] == {"too_large": 1}, summary


def test_the_readme_tiny_command_gives_the_devices_its_mesh_needs():
  line = next(line for line in (REPO / "README.md").read_text().splitlines()
              if "--config=configs/tiny.py --workdir=/tmp/tiny " in line and "python -m oclear_jax.main" in line)
  devices = re.search(r"XLA_FLAGS=--xla_force_host_platform_device_count=(\d+)", line)
  mesh = tiny.get_config().mesh.shape
  assert devices and int(devices.group(1)) == int(np.prod(mesh)), (line, mesh)
