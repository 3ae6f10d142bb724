"""Test setup: 8 simulated CPU devices, offline Hugging Face, quiet TensorFlow.

The environment variables must be set before jax (or anything importing it) loads,
which is why they live at the top of conftest.py.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache per checkout, shared by the pytest-xdist workers and by the
# processes tests start (they inherit the environment): many tests train the same tiny models, and
# compiling them is most of their time. Entries are keyed by the program, devices, flags and jax
# version, so a cached executable is the one XLA would compile. Every compilation is kept (a tiny
# model's steps compile in under a second each, below jax's default threshold), and no size cap is
# set: with a cap, jax locks the folder and sums its files' sizes on every write.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FASHION_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion_small12k"


@pytest.fixture(scope="session")
def fashion_dir():
  """The real Myntra sample, or a clean skip where it is absent."""
  if not (FASHION_DIR / "meta.csv").exists():
    pytest.skip(f"real catalogue not found at {FASHION_DIR}")
  return FASHION_DIR
