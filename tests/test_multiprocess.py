"""Several real JAX processes on localhost (oclear_jax.distributed.launch): a pod run, simulated on one machine.

Each test starts `python -m oclear_jax.distributed.launch` with 2 processes x 4 CPU devices, a free coordinator
port and cross-process CPU collectives (gloo), as issue 15 asks: distributed init, a mesh over both
processes' devices, and a bad catalogue that ends both processes with the same one-line error
instead of leaving one waiting in a barrier.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from oclear_jax.distributed import launch
from oclear_jax.distributed import multihost

REPO = pathlib.Path(__file__).resolve().parents[1]
# A hang would otherwise stall the suite: JAX's own timeouts are minutes.
TIMEOUT_S = 60


def _launch(*args, module="oclear_jax.main"):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the launcher sets each process's
  env["PYTHONPATH"] = str(REPO)
  start = time.monotonic()
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "oclear_jax.distributed.launch", "--num_processes=2", "--devices_per_process=4",
         f"--port={launch.free_port()}", f"--module={module}", "--", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"2 processes still running after {TIMEOUT_S} s (a hang); output: {(e.stderr or '')[-3000:]}")
  return proc, time.monotonic() - start


def _by_process(text: str, marker: str) -> dict[int, list[str]]:
  """The launcher's `[pI] ...` lines that contain `marker`, per process, prefix removed."""
  out = {0: [], 1: []}
  for line in text.splitlines():
    for i in out:
      if line.startswith(f"[p{i}] ") and marker in line:
        out[i].append(line[len(f"[p{i}] "):])
  return out


def test_two_processes_of_four_devices_form_one_mesh_and_reduce_across_processes():
  proc, _ = _launch(module="tests.multiprocess_smoke")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = {i: json.loads(lines[-1][len("RESULT "):]) for i, lines in _by_process(proc.stdout, "RESULT ").items()}
  for i, r in results.items():
    assert r["joined"] and r["process_index"] == i
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4)
    assert r["mesh_shape"] == {"data": 4, "model": 2} and r["mesh_processes"] == [0, 1]
    assert r["x_shape"] == [16, 3] and r["jit_sum_ok"] and r["psum_ok"]  # equal to numpy's sum of both shares
    assert "needs 6 devices but 8 exist (2 processes x 4 local devices)" in r["mesh_error"]
    # Raised on process 1 only: process 0 rebuilds each with its type and whole message, where it can.
    assert r["agreed"] == ["ValueError: row 7 of part-1.csv has no image; " + "é" * 3000,
                           "FileNotFoundError: [Errno 2] No such file: 'a.csv'",
                           "IncompatibleCheckpointError: step 4 has another shape",
                           "KeyError: 'k'" if i == 1 else "HostError: KeyError: 'k'"]
  assert results[0]["from_zero"] == "written once" and results[1]["from_zero"] is None
  # Values of different sizes per process, int64 beyond 32 bits: every process gets both, exactly.
  big = 2**40
  for r in results.values():
    assert r["gathered"] == [{"p": 0, "ids": [big], "dtype": "int64", "title": ""},
                             {"p": 1, "ids": [big, big + 1], "dtype": "int64", "title": "é" * 5000}]


def test_bad_catalogue_is_the_same_one_line_error_on_both_processes(tmp_path):
  root = tmp_path / "cat"
  root.mkdir()
  (root / "catalogue.csv").write_text("id,title,label\nx,a red shirt,l\n")  # no image column
  proc, seconds = _launch("--mode=prepare", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                          "--config.data.source=csv", f"--config.data.root={root}",
                          "--config.data.columns.kind=", "--config.data.columns.split=")
  errors = _by_process(proc.stderr, "error: ")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "exit codes [2, 2]" in proc.stderr  # both ended on their own, neither was killed
  assert len(errors[0]) == len(errors[1]) == 1 and errors[0] == errors[1], proc.stderr[-3000:]
  assert errors[0][0].startswith("error: ") and "no column 'image'" in errors[0][0]
  assert "Traceback" not in proc.stderr
  assert seconds < TIMEOUT_S


def test_initialize_distributed_stays_single_process_without_a_cluster(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri",
               "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert multihost.detected_cluster() is None
  assert multihost.initialize_distributed("auto") is False
  assert multihost.initialize_distributed("auto", num_processes=1) is False
  assert multihost.initialize_distributed("off") is False
  with pytest.raises(ValueError, match="--distributed=off contradicts --num_processes"):
    multihost.initialize_distributed("off", num_processes=2)
  with pytest.raises(ValueError, match="expected one of"):
    multihost.initialize_distributed("sometimes")


def test_one_process_failure_is_reported_whole_and_raised_as_itself():
  from oclear_jax import checkpoint  # pylint: disable=g-import-not-at-top
  long = "row 7 of part-1.csv has no image; " + "é" * 3000  # over 4,096 bytes of UTF-8: nothing is cut
  assert len(long.encode("utf-8")) > 6000
  for error, kind, message in (
      (ValueError(long), "builtins.ValueError", long),
      (FileNotFoundError(2, "No such file", "a.csv"), "builtins.FileNotFoundError", "[Errno 2] No such file: 'a.csv'"),
      (checkpoint.IncompatibleCheckpointError("step 4"), "oclear_jax.checkpoint.IncompatibleCheckpointError",
       "step 4")):
    assert multihost.process_failures(error) == [(0, kind, message)]
    with pytest.raises(type(error)) as raised:
      multihost.raise_if_any_process_failed(error)
    assert raised.value is error  # its own exception, traceback intact
  assert multihost.process_failures(None) == []
  assert multihost.raise_if_any_process_failed(None) is None


def test_launcher_gives_each_process_its_devices_and_flags():
  env = launch.process_env(
      4, "cpu", base={"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu"
  assert launch.process_command("oclear_jax.main", ["--mode=prepare"], port=1234, num_processes=2, process_id=1)[1:] \
      == ["-m", "oclear_jax.main", "--mode=prepare", "--coordinator_address=127.0.0.1:1234", "--num_processes=2",
          "--process_id=1"]
