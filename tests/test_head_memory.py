"""The compile-only memory analysis the scaling benchmark and the sharding notebook print."""
import pytest

from benchmarks import head_memory


def test_per_device_state_is_the_ideal_share_and_halves_with_twice_the_devices():
  four = head_memory.head_memory(4, 100_003, 64, 256, None)
  eight = head_memory.head_memory(8, 100_003, 64, 256, None)
  ideal = lambda n: 100_003 * 64 * 4 * 3 / n / 2**30  # centres + Adam mu, nu in f32, split n ways
  assert four["ratio"] == pytest.approx(1.0, abs=0.01) and eight["ratio"] == pytest.approx(1.0, abs=0.01)
  assert four["state_check"] and eight["state_check"]
  assert four["args_gib"] == pytest.approx(ideal(4), rel=0.02) and eight["args_gib"] == pytest.approx(ideal(8), rel=0.02)


def test_chunking_caps_temporaries_independently_of_the_class_count():
  small = head_memory.head_memory(8, 400_000, 64, 256, 1024)
  big = head_memory.head_memory(8, 1_600_000, 64, 256, 1024)
  unchunked = head_memory.head_memory(8, 1_600_000, 64, 256, None)
  # Beyond one centres-shaped buffer (the gradient; AdamW updates the donated state in place) the
  # chunked step needs a few [rows, chunk] blocks whatever C is; the unchunked one [rows, C/N] blocks.
  assert 0 < big["rest_per_block"] == pytest.approx(small["rest_per_block"], rel=0.3)
  assert big["temp_gib"] - big["shard_gib"] < 0.2 * (unchunked["temp_gib"] - unchunked["shard_gib"])
