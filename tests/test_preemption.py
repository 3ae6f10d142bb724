"""Preemption and multi-host checkpoints: SIGTERM saves the step in flight, a rerun resumes it exactly.

- A tiny training run in a subprocess gets SIGTERM mid-run: it saves the step it had trained (not
  the last multiple of checkpoint_every), prints one `preempted:` line, exits with code 75, and the
  rerun ends bitwise equal to an uninterrupted run.
- The store saves at save_interval_steps and the last step only, plus the preempted step.
- 2 processes (oclear_jax.distributed.launch): a torn step, or one that only process 1 cannot read, is set
  aside once by process 0 and both resume from the step before; SIGTERM on one host makes both
  save the same step and stop (tests/multiprocess_checkpoint.py).
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from oclear_jax import checkpoint
from oclear_jax.distributed import launch
from oclear_jax.distributed import preemption
from oclear_jax.train import trainer
import trained_state

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # a hang would otherwise stall the suite
STEPS = 16
# checkpoint_every = the last step: any other checkpoint on disk can only be the preempted one.
TRAIN = {"num_steps": STEPS, "checkpoint_every": STEPS, "log_every": 1}
EVAL = {"at_start": False, "scann": False, "contact_sheet_queries": 0}


def _config():
  config = tiny.get_config()
  config.train.update(TRAIN)
  config.eval.update(EVAL)
  return config


def _overrides():
  return [f"--config.{section}.{k}={v}" for section, values in (("train", TRAIN), ("eval", EVAL))
          for k, v in values.items()]


def _signal_after_step(workdir, step: int, signum=signal.SIGTERM, *, again: bool = False,
                       overrides=()) -> tuple[int, list[int], str, float]:
  """(exit code, the steps it printed, its stderr, seconds from the last signal to its exit) of a run sent
  `signum` once it printed `step`; `again`: a second SIGINT once it said it is saving (Ctrl-C twice)."""
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  stderr_path = pathlib.Path(f"{workdir}.stderr")  # a file, not a pipe nobody reads while waiting for `step`
  with open(stderr_path, "w", encoding="utf-8") as stderr:
    proc = subprocess.Popen(
        [sys.executable, "-m", "oclear_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
         *_overrides(), *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    printed = []
    try:
      for line in proc.stdout:
        match = re.match(r"step (\d+)/", line)
        if match:
          printed.append(int(match.group(1)))
          if printed[-1] == step:
            proc.send_signal(signum)
            signalled = time.perf_counter()
            break
      while again and "Ctrl-C again" not in stderr_path.read_text(encoding="utf-8"):
        assert proc.poll() is None, stderr_path.read_text(encoding="utf-8")[-3000:]
        time.sleep(0.01)
      if again:
        proc.send_signal(signal.SIGINT)
        signalled = time.perf_counter()
      rest, _ = proc.communicate(timeout=TIMEOUT_S)
      seconds = time.perf_counter() - signalled
    except subprocess.TimeoutExpired:
      proc.kill()
      pytest.fail(f"the run did not stop within {TIMEOUT_S} s of {signal.Signals(signum).name}")
  printed += [int(m) for m in re.findall(r"^step (\d+)/", rest, re.M)]
  return proc.returncode, printed, stderr_path.read_text(encoding="utf-8"), seconds


def _leaves(config, workdir):
  _, state, step = trained_state.restore_trained_state(config, str(workdir))
  return step, jax.tree.leaves(state)


def _train_rows(workdir) -> list[int]:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: the reference every interrupted-and-resumed run must equal."""
  workdir = tmp_path_factory.mktemp("straight")
  trainer.train_and_evaluate(_config(), str(workdir), progress=False)
  return workdir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_saves_the_step_in_flight_and_the_rerun_ends_equal_to_an_uninterrupted_run(
    signum, straight, tmp_path, capsys):
  code, printed, stderr, _ = _signal_after_step(tmp_path / "preempted", 3, signum)
  word = "preempted" if signum == signal.SIGTERM else r"interrupted \(Ctrl-C\)"
  lines = [line for line in stderr.splitlines() if re.match(rf"^{word}: ", line)]
  assert code == preemption.PREEMPTED_EXIT_CODE == 75, stderr[-3000:]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert not re.search(r"^[EW]\d{4} ", stderr, re.M), stderr[-3000:]  # no absl log line beside ours
  saved = int(re.match(rf"{word}: step (\d+) saved in ", lines[0]).group(1))
  # The step saved is the last one it trained, not a multiple of checkpoint_every (nothing else is on disk).
  assert 3 <= saved == max(printed) < STEPS, (printed, lines)
  assert sorted(os.listdir(tmp_path / "preempted" / "checkpoints")) == [str(saved)]
  assert not (tmp_path / "preempted" / "train.lock").exists()  # released on the way out

  config = _config()
  capsys.readouterr()
  assert trainer.train_and_evaluate(config, str(tmp_path / "preempted"))["final_step"] == STEPS
  resumed = [int(s) for s in re.findall(r"^step (\d+)/", capsys.readouterr().out, re.M)]
  assert resumed[0] == saved + 1 and resumed[-1] == STEPS  # resumed, not restarted
  # metrics.jsonl: each step's row once, as the uninterrupted run wrote them.
  assert _train_rows(tmp_path / "preempted") == _train_rows(straight) == list(range(1, STEPS + 1))
  (step_a, a), (step_b, b) = _leaves(config, straight), _leaves(config, tmp_path / "preempted")
  assert step_a == step_b == STEPS and len(a) == len(b) > 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ctrl_c_twice_exits_at_once_and_the_next_run_takes_over_its_lock(tmp_path, capsys):
  # Step 4 is followed by an evaluation (eval.every=4): both signals arrive while it runs.
  code, _, stderr, seconds = _signal_after_step(tmp_path / "twice", 4, signal.SIGINT, again=True,
                                                overrides=["--config.eval.every=4"])
  assert code == 128 + signal.SIGINT, stderr[-3000:]
  assert "SIGINT again: exiting at once" in stderr and "Traceback" not in stderr, stderr[-3000:]
  assert seconds < 10, seconds  # "at once": no save, no teardown (a hang would take TIMEOUT_S)
  assert (tmp_path / "twice" / "train.lock").exists()  # left behind by a process that no longer exists
  assert not [p for p in os.listdir(tmp_path / "twice" / "checkpoints") if not p.isdigit()]  # nothing half-written
  capsys.readouterr()
  config = _config()
  config.eval.every = 4
  assert trainer.train_and_evaluate(config, str(tmp_path / "twice"), progress=False)["final_step"] == STEPS
  assert "took over the lock" in capsys.readouterr().err


def test_store_saves_every_interval_and_the_last_step_and_the_preempted_one(tmp_path):
  state = {"w": jax.numpy.arange(4.0)}
  store = checkpoint.CheckpointStore(tmp_path / "interval", async_save=False, save_interval_steps=4,
                                     save_on_steps=(10,))
  assert [s for s in range(1, 11) if store.should_save(s) and store.save(s, state, force=True)] == [4, 8, 10]
  store.close()

  before = signal.getsignal(signal.SIGTERM)
  store = checkpoint.CheckpointStore(tmp_path / "preempted", save_interval_steps=4, save_on_steps=(10,),
                                     preemption=preemption.PreemptionNotice())
  saved = []
  with pytest.raises(preemption.Preempted, match=r"^preempted: step 6 saved in .*exit code 75"):
    for step in range(1, 11):
      if step == 6:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 6 is in flight
      if store.should_save(step):
        saved.append(step)
        store.save(step, state, force=True)
      store.stop_if_preempted(step)
  assert saved == [4, 6] and checkpoint.CheckpointStore(tmp_path / "preempted").all_steps() == [4, 6]
  assert signal.getsignal(signal.SIGTERM) == before  # SIGTERM is handed back once the run stops


def test_two_processes_set_a_broken_step_aside_once_and_save_the_same_preempted_step(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the launcher sets each process's
  env["PYTHONPATH"] = str(REPO)
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "oclear_jax.distributed.launch", "--num_processes=2", "--devices_per_process=4",
         f"--port={launch.free_port()}", "--module=tests.multiprocess_checkpoint", "--", f"--root={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"2 processes still running after {TIMEOUT_S} s (a hang); output: {(e.stderr or '')[-3000:]}")
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, proc.stderr[-4000:]
  assert "exit codes [75, 75]" in proc.stderr
  results = {}
  for line in proc.stdout.splitlines():
    if "RESULT " in line:
      result = json.loads(line.split("RESULT ", 1)[1])
      results[result["process_index"]] = result
  assert sorted(results) == [0, 1], proc.stdout[-3000:]
  assert results[0]["cut"] > 0
  for r in results.values():
    assert (r["torn_step"], r["torn_value"], r["torn_broken"]) == (2, 2.0, [3])  # torn step 3: both use 2
    assert (r["one_step"], r["one_value"], r["one_broken"]) == (1, 1.0, [2])  # process 1 alone failed on 2
    assert r["one_reason"].startswith("process 1: OSError")
    assert r["aside"] == ["2", "3"] and r["left"] == ["1"]  # each moved once (a second move would be "3.1")
  # SIGTERM reached process 1 only; both stopped at one agreed step, saved it, and nothing else.
  assert results[1]["signalled_at"] == 5 and results[0]["signalled_at"] is None
  steps = {r["preempted"] for r in results.values()}
  assert len(steps) == 1 and next(iter(steps)).startswith("preempted: step ")
  saved = int(re.match(r"preempted: step (\d+)", next(iter(steps))).group(1))
  assert saved > 5 and results[0]["saved_steps"] == results[1]["saved_steps"] == [saved]
