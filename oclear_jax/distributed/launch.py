r"""Runs one command as N local JAX processes: a pod's multi-host run, simulated on one machine.

  python -m oclear_jax.distributed.launch --num_processes=2 --devices_per_process=4 -- \
      --config=configs/tiny.py --workdir=/tmp/tiny2

starts `python -m oclear_jax.main <the arguments after -->` N times, process i with
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i` (PORT a free local port)
and `XLA_FLAGS=--xla_force_host_platform_device_count=K`, so the run sees N*K CPU devices over N
processes exactly as a pod slice's hosts see theirs: cross-process collectives, one writer per
file, per-host input shares. Each output line is prefixed with `[pI]`. The launcher exits 0 when
every process does; when one fails it waits --grace_s for the others to end on their own (they
should: an error on one host is an error on all, oclear_jax/distributed/multihost.py), then kills them, and
exits with the first failure's code. Nothing is left hanging.

On a real cluster there is no launcher: run the usual command on every host (TPU VM slices, SLURM
and Open MPI are detected by JAX), or pass the three flags yourself. `--module` runs another module
that accepts the same three flags (tests use it).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
  """A TCP port nobody listens on now (the OS picks it; a tiny race with other programs remains)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, platform: str, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of each process: K simulated host devices (replacing any count already set)."""
  env = dict(os.environ if base is None else base)
  xla_flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
  if platform:
    env["JAX_PLATFORMS"] = platform
  env["PYTHONUNBUFFERED"] = "1"  # lines appear as they are printed, not when a buffer fills
  return env


def process_command(module: str, args: list[str], *, port: int, num_processes: int, process_id: int) -> list[str]:
  return [sys.executable, "-m", module, *args, f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={num_processes}", f"--process_id={process_id}"]


def join_from_arguments(parser) -> Any:
  """For a `--module` of one's own: its arguments plus the three `process_command` adds, parsed, and
  this process joined to the others (`multihost.initialize_distributed`) before anything uses jax."""
  for name, kind in (("--coordinator_address", str), ("--num_processes", int), ("--process_id", int)):
    parser.add_argument(name, type=kind)
  args = parser.parse_args()
  from oclear_jax.distributed import multihost  # pylint: disable=g-import-not-at-top  (jax after the flags)
  multihost.initialize_distributed("auto", coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
  return args


def _forward(stream, out, prefix: str) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()
  stream.close()


def _stop(processes: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
  """SIGTERM the processes still running, SIGKILL whoever outlives `timeout_s`."""
  for p in processes:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + timeout_s
  for p in processes:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(args: list[str], *, num_processes: int, devices_per_process: int, module: str = "oclear_jax.main",
           platform: str = "cpu", grace_s: float = 20.0, port: int | None = None) -> int:
  """Runs the N processes to the end; 0 if all succeed, else the first failure's exit code (>0)."""
  port = port or free_port()
  env = process_env(devices_per_process, platform)
  processes, threads = [], []
  try:
    for i in range(num_processes):
      p = subprocess.Popen(
          process_command(module, args, port=port, num_processes=num_processes, process_id=i),
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
      processes.append(p)
      for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
        threads.append(threading.Thread(target=_forward, args=(stream, out, f"[p{i}] "), daemon=True))
        threads[-1].start()
    failed_at, first_failure = None, None
    while any(p.poll() is None for p in processes):
      if first_failure is None:
        first_failure = next((p for p in processes if p.poll() not in (None, 0)), None)
        failed_at = time.monotonic() if first_failure is not None else None
      elif time.monotonic() - failed_at > grace_s:
        running = [i for i, p in enumerate(processes) if p.poll() is None]
        print(f"launch: process {processes.index(first_failure)} failed; stopping processes {running} still "
              f"running after {grace_s:.0f} s", file=sys.stderr, flush=True)
        break
      time.sleep(0.1)
  finally:  # also on Ctrl-C or an error here: no process outlives the launcher
    _stop(processes)
    for t in threads:
      t.join(timeout=5)
  codes = [p.returncode for p in processes]
  first_failure = first_failure or next((p for p in processes if p.returncode != 0), None)
  if first_failure is None:
    return 0
  print(f"launch: exit codes {codes}", file=sys.stderr, flush=True)
  return first_failure.returncode if first_failure.returncode > 0 else 1


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  parser = argparse.ArgumentParser(prog="python -m oclear_jax.distributed.launch", description=__doc__.split("\n\n")[0],
                                   epilog="Arguments after -- go to every process unchanged.")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="simulated CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count)")
  parser.add_argument("--module", default="oclear_jax.main", help="the module each process runs (python -m)")
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the processes; '' keeps the environment's")
  parser.add_argument("--grace_s", type=float, default=20.0,
                      help="after one process fails, seconds the others get to end on their own before being killed")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  opts = parser.parse_args(own)
  if opts.num_processes < 1 or opts.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be at least 1")
  return launch(rest, num_processes=opts.num_processes, devices_per_process=opts.devices_per_process,
                module=opts.module, platform=opts.platform, grace_s=opts.grace_s, port=opts.port)


if __name__ == "__main__":
  sys.exit(main())
