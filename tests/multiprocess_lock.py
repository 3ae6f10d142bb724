"""One process of tests/test_workdir_lock.py's 2-process check (started by `python -m oclear_jax.distributed.launch`).

--role=holder: the run takes the workdir lock (process 0 on behalf of both), each process writes
  `held.<index>`, and both keep it until the test writes `release`.
--role=intruder: a second 2-process run on the same workdir; every process prints
  `RESULT {"process_index": i, "error": "..."}` with the refusal it got (or "" if it got the lock).
"""
import argparse
import json
import os
import sys
import time

from oclear_jax.distributed import launch


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--root")
  parser.add_argument("--role", choices=("holder", "intruder"))
  args = launch.join_from_arguments(parser)
  from oclear_jax.distributed import multihost  # pylint: disable=g-import-not-at-top  (jax after the flags)
  import jax  # pylint: disable=g-import-not-at-top
  from oclear_jax.distributed import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.root, "run")
  if args.role == "holder":
    with workdir_lock.hold(workdir):
      open(os.path.join(args.root, f"held.{jax.process_index()}"), "w").close()
      deadline = time.time() + 120
      while not os.path.exists(os.path.join(args.root, "release")) and time.time() < deadline:
        time.sleep(0.1)
      multihost.raise_if_any_process_failed(None)  # both leave together
    return 0
  error = ""
  try:
    with workdir_lock.hold(workdir):
      pass
  except workdir_lock.WorkdirLocked as e:
    error = str(e)
  print("RESULT " + json.dumps({"process_index": jax.process_index(), "error": error}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
