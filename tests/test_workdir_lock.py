"""One writer per workdir (oclear_jax/distributed/workdir_lock.py), checked with real processes.

- a live holder (another process) is refused by name: its pid, host and start time;
- of several processes racing for a fresh workdir exactly one wins (the compare-and-swap);
- a dead holder's lock (its pid gone, or a host whose heartbeat stopped) is taken over with a warning,
  a fresh heartbeat from another host is not;
- a holder whose lock is taken over stops at once (it would otherwise interleave with the new one);
- on 2 processes (oclear_jax.distributed.launch) one run holds the lock for both, and a second
  2-process run refuses on every process.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from oclear_jax.distributed import launch
from oclear_jax.distributed import workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
_ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _python(code: str, *args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


HOLD = """
import sys, time
from oclear_jax.distributed import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1], stale_after_s=float(sys.argv[2]))
try:
  lock.acquire()
except workdir_lock.WorkdirLocked as e:
  print("REFUSED", e, flush=True)
  sys.exit(0)
print("HELD", flush=True)
time.sleep(float(sys.argv[3]))
lock.release()
"""


def _wait_for(proc: subprocess.Popen, word: str) -> str:
  line = proc.stdout.readline()
  assert line.startswith(word), (line, proc.stderr.read() if proc.poll() is not None else "")
  return line


def test_a_live_holder_is_refused_by_name_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  holder = _python(HOLD, workdir, "120", "60")
  try:
    _wait_for(holder, "HELD")
    with pytest.raises(workdir_lock.WorkdirLocked,
                       match=rf"in use by another training run: pid {holder.pid} on host {socket.gethostname()}, "
                             rf"started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC"):
      workdir_lock.WorkdirLock(workdir).acquire()
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]  # the refusal wrote nothing
  finally:
    holder.kill()  # SIGKILL: no release, the lock stays behind
    holder.wait()
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()  # its pid is gone on this host: taken over at once
  assert f"from a run that is gone (pid {holder.pid}" in capsys.readouterr().err
  assert f"process {holder.pid} is not running on this host" in lock.took_over
  assert json.loads((tmp_path / "run" / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / "run" / workdir_lock.LOCK_FILE).exists()


def test_another_hosts_lock_is_held_while_it_beats_and_taken_over_once_stale(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  record = {"run": "r", "pid": 1, "host": "another-host", "started": time.time() - 3600}
  path = tmp_path / "run" / workdir_lock.LOCK_FILE
  path.write_text(json.dumps({**record, "heartbeat": time.time() - 5}))
  with pytest.raises(workdir_lock.WorkdirLocked, match="pid 1 on host another-host"):
    workdir_lock.WorkdirLock(workdir, stale_after_s=60).acquire()
  path.write_text(json.dumps({**record, "heartbeat": time.time() - 61}))
  lock = workdir_lock.WorkdirLock(workdir, stale_after_s=60)
  lock.acquire()
  assert "heartbeat is 61 s old" in lock.took_over
  lock.release()


def test_of_racing_processes_exactly_one_takes_a_fresh_lock(tmp_path):
  workdir = str(tmp_path / "run")
  start = time.time() + 4  # every racer imports first, then all try at once
  race = HOLD.replace('lock.acquire()', f'time.sleep(max(0, {start} - time.time())); lock.acquire()')
  racers = [_python(race, workdir, "120", "3") for _ in range(5)]
  outcomes = [racer.communicate(timeout=TIMEOUT_S)[0].split(" ", 1)[0].strip() for racer in racers]
  assert sorted(outcomes) == ["HELD"] + ["REFUSED"] * 4, outcomes


def test_a_holder_whose_lock_was_taken_over_stops_at_once(tmp_path):
  workdir = str(tmp_path / "run")
  holder = _python(HOLD, workdir, "0.4", "60")  # heartbeat every 0.1 s
  _wait_for(holder, "HELD")
  kv_lock = workdir_lock.WorkdirLock(workdir)
  _, generation = kv_lock.read()
  kv_lock._cas(json.dumps({"run": "thief", "pid": os.getpid(), "host": socket.gethostname(),  # pylint: disable=protected-access
                           "started": time.time(), "heartbeat": time.time()}).encode(), generation)
  try:
    _, err = holder.communicate(timeout=20)
  except subprocess.TimeoutExpired:
    holder.kill()
    pytest.fail("the holder kept running after its lock was taken over")
  assert holder.returncode == 3 and "took over" in err and f"pid {os.getpid()}" in err, err


def test_two_processes_hold_one_lock_and_a_second_two_process_run_is_refused_on_both(tmp_path):
  env = {k: v for k, v in _ENV.items() if k != "XLA_FLAGS"}
  command = [sys.executable, "-m", "oclear_jax.distributed.launch", "--num_processes=2", "--devices_per_process=2",
             "--module=tests.multiprocess_lock"]
  holder = subprocess.Popen([*command, f"--port={launch.free_port()}", "--", f"--root={tmp_path}", "--role=holder"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + TIMEOUT_S
    while not all((tmp_path / f"held.{i}").exists() for i in (0, 1)):
      assert holder.poll() is None and time.time() < deadline, holder.stderr.read()[-3000:]
      time.sleep(0.2)
    lock = json.loads((tmp_path / "run" / workdir_lock.LOCK_FILE).read_text())
    intruder = subprocess.run([*command, f"--port={launch.free_port()}", "--", f"--root={tmp_path}",
                               "--role=intruder"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in intruder.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["process_index"] for r in results) == [0, 1], intruder.stderr[-3000:]
    for r in results:  # both processes of the second run refuse, naming the first run's process 0
      assert f"pid {lock['pid']} on host {lock['host']}" in r["error"], r
  finally:
    (tmp_path / "release").write_text("")
    holder.communicate(timeout=TIMEOUT_S)
  assert holder.returncode == 0
  assert not (tmp_path / "run" / workdir_lock.LOCK_FILE).exists()  # released by the run that held it
