"""`--mode=prepare`: the run's catalogue -> records only (what `train` does first, and reuses)."""
from __future__ import annotations

import ml_collections

from oclear_jax import run_data


def run(config: ml_collections.ConfigDict, workdir: str) -> run_data.PreparedData:
  prepared = run_data.prepare_data(config.data, workdir, seed=config.seed)
  print(f"records: {prepared.records_dir}\n{prepared.summary}")
  return prepared
