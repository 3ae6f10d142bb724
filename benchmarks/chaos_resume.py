r"""Preemption drill: SIGKILL a training run at random steps, resume it, compare with an unbroken run.

  python benchmarks/chaos_resume.py                 # 5 kills (seeded) over 60 steps of configs/tiny.py
  python benchmarks/chaos_resume.py --kills 8 --seed 3 --num_steps 80

Both runs are the same command line (`python -m oclear_jax.main --config=configs/tiny.py ...`) on
8 simulated CPU devices. The chaos run is killed with SIGKILL (no clean-up, possibly mid
checkpoint write) as soon as it reports each chosen step, then restarted with the same command.
At the end the final parameters and optimizer state of both runs are compared leaf by leaf.
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from oclear_jax import checkpoint  # noqa: E402
from oclear_jax import sharding  # noqa: E402
from oclear_jax.serving import trained_run  # noqa: E402
from oclear_jax.train import trainer  # noqa: E402

STEP_LINE = re.compile(r"^step (\d+)/")


def overrides(num_steps: int, checkpoint_every: int) -> list[str]:
  return [f"--config.train.num_steps={num_steps}", f"--config.train.checkpoint_every={checkpoint_every}",
          "--config.train.log_every=1", "--config.eval.at_start=False", "--config.eval.scann=False",
          "--config.eval.contact_sheet_queries=0"]


def launch(workdir: str, args: list[str]) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen([sys.executable, "-m", "oclear_jax.main", "--config=configs/tiny.py",
                           f"--workdir={workdir}", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def saved_steps(workdir: str) -> list[int]:
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def final_state(config, workdir: str):
  """(state, step): the run's latest train state, whole (parameters and optimizer state), read-only.

  Serving reads parameters alone (`trained_run.restore_trained_model`); this drill compares the
  optimizer state too, so it restores the full state onto the task's own layout.
  """
  records = trained_run.run_records(config, workdir)
  task = trainer.OclearTask(config, sharding.make_mesh(config.mesh.shape), num_classes=records.num_classes,
                            vocab_size=records.vocab_size, title_special_ids=records.title_special_ids)
  abstract, shardings = task.abstract_state()
  store = checkpoint.CheckpointStore(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    state, step = store.restore(checkpoint.abstract_with_shardings(abstract, shardings))
  finally:
    store.close()
  store.report_broken(step)
  if state is None:
    raise RuntimeError(f"no readable checkpoint in {workdir}/checkpoints")
  return state, step


def run_until(workdir: str, args: list[str], kill_at: int | None) -> tuple[int, int, float]:
  """Runs (and kills after `kill_at`); returns (first step run, last step seen, seconds)."""
  start = time.perf_counter()
  proc = launch(workdir, args)
  first = last = None
  for line in proc.stdout:
    match = STEP_LINE.match(line)
    if match:
      last = int(match.group(1))
      first = last if first is None else first
      if kill_at is not None and last >= kill_at:
        proc.send_signal(signal.SIGKILL)
        break
  proc.wait()
  if kill_at is None and proc.returncode != 0:
    raise RuntimeError(f"run in {workdir} failed with exit code {proc.returncode}")
  return first or 0, last or 0, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_steps", type=int, default=60)
  parser.add_argument("--checkpoint_every", type=int, default=5)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "oclear_chaos"))
  args = parser.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  straight, chaos = os.path.join(args.workdir, "straight"), os.path.join(args.workdir, "chaos")
  flags = overrides(args.num_steps, args.checkpoint_every)

  kill_steps = sorted(np.random.default_rng(args.seed).choice(
      np.arange(2, args.num_steps), size=args.kills, replace=False).tolist())
  print(f"kill steps (seed {args.seed}): {kill_steps}", flush=True)
  _, _, straight_s = run_until(straight, flags, None)
  print(f"uninterrupted run: {args.num_steps} steps in {straight_s:.0f} s", flush=True)

  rows, repeated = [], 0
  for kill_at in kill_steps:
    first, last, seconds = run_until(chaos, flags, kill_at)
    saved = saved_steps(chaos)
    repeated_now = last - (saved[-1] if saved else 0)
    rows.append((kill_at, first, last, saved[-1] if saved else 0, repeated_now, seconds))
    repeated += repeated_now
  first, last, seconds = run_until(chaos, flags, None)
  rows.append(("-", first, last, args.num_steps, 0, seconds))

  print(f"\n{'kill at':>8} {'resumed at':>10} {'killed after':>12} {'last ckpt':>9} {'to repeat':>9} {'s':>5}")
  for kill_at, first, last, ckpt, again, seconds in rows:
    print(f"{kill_at!s:>8} {first:>10} {last:>12} {ckpt:>9} {again:>9} {seconds:5.0f}")

  config = tiny.get_config()
  config.train.num_steps = args.num_steps
  a, step_a = final_state(config, straight)
  b, step_b = final_state(config, chaos)
  diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  identical = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  print(f"\nkills survived: {len(kill_steps)}; steps repeated after restarts: {repeated}; final steps {step_a} vs "
        f"{step_b}; state arrays compared: {len(diffs)}; max abs difference: {max(diffs):.3g}; "
        f"bitwise identical: {identical}")
  sys.exit(0 if identical and step_a == step_b == args.num_steps else 1)


if __name__ == "__main__":
  main()
