"""One live training run per workdir: `{workdir}/train.lock`, taken by compare-and-swap, renewed by a heartbeat.

  with workdir_lock.hold(workdir, stale_after_s=config.train.lock_stale_s):
    ...  # train; a second run on the same workdir refuses at once, naming this one

The lock is one small JSON object (run id, pid, host, start time, heartbeat) written through
tensorstore's key-value store, whose conditional write (`if_equal=` a storage generation) is an
atomic compare-and-swap on every driver we use: `file` (a local or shared POSIX folder; tensorstore
serialises conditional writes with its own lock files) and `gcs` (a gs:// workdir: the object's
`ifGenerationMatch` precondition, so of two pods racing for one bucket prefix exactly one create
succeeds). ram:// workdirs (tests) use the in-process `memory` driver. Every transition is one CAS:

- take:      missing -> ours (create-if-absent);
- take over: a dead holder's generation -> ours, so of two runs finding the same dead lock one wins;
- heartbeat: ours -> ours with a new time, every `stale_after_s / 4` seconds (a thread);
- release:   ours -> deleted.

A holder is dead when its heartbeat is older than `stale_after_s` (a lost host, a frozen VM), or,
on this host, when its pid is gone or now names another process (pid and its start time in
/proc). A heartbeat CAS that fails means another run took the lock over (this run was presumed
dead): the process then stops at once without writing anything more (`os._exit`), rather than
interleave two writers.

Several processes of one run (a pod): process 0 alone takes, renews and releases the lock, on
behalf of the run; `hold` makes its outcome every process's (`multihost.raise_if_any_process_failed`),
so a second run's processes all refuse together. Readers (index, search, embed, evaluate) never
take it: checkpoints become visible only once complete (orbax renames a finished step into place).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import jax
import tensorstore as ts

from input_pipeline import paths
from oclear_jax.distributed import multihost

LOCK_FILE = "train.lock"
_MEMORY_STORES: dict[str, ts.KvStore] = {}  # ram:// workdirs: one in-process store per path


class WorkdirLocked(ValueError):
  """Another live run holds the workdir's lock (a user-facing error: main.py prints one line)."""


@dataclasses.dataclass(frozen=True)
class Holder:
  run: str
  pid: int
  host: str
  started: float
  heartbeat: float
  pid_start: str = ""  # /proc/<pid>/stat's start time: tells a reused pid from the holder

  def describe(self, now: float) -> str:
    started = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {self.pid} on host {self.host}, started {started}, last heartbeat {now - self.heartbeat:.0f} s ago"


def _process_start(pid: int) -> str:
  """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), '' where unknown or gone."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return f.read().rpartition(")")[2].split()[19]
  except (OSError, IndexError):
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True


def dead_reason(holder: Holder, *, now: float, stale_after_s: float) -> str:
  """'' while `holder` may be alive; else why it is not (what the takeover warning says)."""
  if now - holder.heartbeat > stale_after_s:
    return f"its heartbeat is {now - holder.heartbeat:.0f} s old (train.lock_stale_s={stale_after_s:g})"
  if holder.host == socket.gethostname():
    if not _pid_alive(holder.pid):
      return f"process {holder.pid} is not running on this host"
    if holder.pid_start and _process_start(holder.pid) not in ("", holder.pid_start):
      return f"pid {holder.pid} now belongs to another process"
  return ""


def _store(workdir: str) -> ts.KvStore:
  root = paths.resolve(workdir).rstrip("/") + "/"
  if root.startswith("gs://"):
    bucket, _, prefix = root[len("gs://"):].partition("/")
    return ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix}).result()
  if root.startswith("ram://"):
    if root not in _MEMORY_STORES:
      _MEMORY_STORES[root] = ts.KvStore.open({"driver": "memory"}).result()
    return _MEMORY_STORES[root]
  if paths.is_remote(root):
    raise ValueError(f"workdir {workdir}: no lock for this kind of URL (local folders, gs:// and ram:// have one)")
  return ts.KvStore.open({"driver": "file", "path": root}).result()


class WorkdirLock:
  """The lock of one workdir, as seen by this process (process 0 of a run)."""

  def __init__(self, workdir: str, *, stale_after_s: float = 120.0):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_FILE)
    self.stale_after_s = float(stale_after_s)
    self._kv = _store(workdir)
    self._generation: bytes | None = None  # ours, while held
    self._record: dict | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.took_over: str = ""  # the warning line when a dead run's lock was taken over

  def read(self) -> tuple[Holder | None, bytes]:
    """(the holder, or None for no lock, and the lock's storage generation)."""
    result = self._kv.read(LOCK_FILE).result()
    if result.state != "value":
      return None, result.stamp.generation
    try:
      record = json.loads(bytes(result.value))
      holder = Holder(**{f.name: record[f.name] for f in dataclasses.fields(Holder) if f.name in record})
    except (ValueError, TypeError) as e:  # a torn or foreign file: nobody can be holding it
      holder = Holder(run="?", pid=-1, host="?", started=0.0, heartbeat=0.0)
      del e
    return holder, result.stamp.generation

  def _cas(self, value: bytes | None, if_equal: bytes) -> bytes | None:
    """The new generation, or None when the lock changed under us (the condition failed)."""
    generation = self._kv.write(LOCK_FILE, value, if_equal=if_equal).result().generation
    return generation or None

  def acquire(self) -> None:
    now = time.time()
    self._record = {"run": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(), "started": now,
                    "heartbeat": now, "pid_start": _process_start(os.getpid()),
                    "command": " ".join(sys.argv)[:500]}
    for _ in range(3):  # a lost race re-reads: the winner is then a live holder
      holder, generation = self.read()
      if holder is not None:
        reason = dead_reason(holder, now=time.time(), stale_after_s=self.stale_after_s)
        if not reason:
          raise WorkdirLocked(
              f"workdir {self.workdir} is in use by another training run: {holder.describe(time.time())} "
              f"({self.path}). Wait for it to finish or stop it; a lock whose process is gone is taken over "
              f"(at once on this host, after train.lock_stale_s={self.stale_after_s:g} s of no heartbeat "
              f"elsewhere)")
        self.took_over = (f"warning: took over the lock of {self.workdir} from a run that is gone "
                          f"({holder.describe(time.time())}; {reason})")
      self._generation = self._cas(self._encode(), generation)
      if self._generation is not None:
        if self.took_over:
          print(self.took_over, file=sys.stderr, flush=True)
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return
      self.took_over = ""
    raise WorkdirLocked(f"workdir {self.workdir}: could not take {self.path} (it kept changing)")

  def _encode(self) -> bytes:
    return json.dumps(self._record).encode()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.stale_after_s / 4):
      self._record["heartbeat"] = time.time()
      try:
        generation = self._cas(self._encode(), self._generation)
      except Exception as e:  # pylint: disable=broad-except  (a transient storage error: try again next beat)
        print(f"warning: could not renew {self.path}: {e}", file=sys.stderr, flush=True)
        continue
      if generation is None and not self._stop.is_set():
        holder, _ = self.read()
        print(f"error: another run took over {self.path} ({holder.describe(time.time()) if holder else 'removed'}); "
              f"this run stops now without writing anything more", file=sys.stderr, flush=True)
        os._exit(3)  # pylint: disable=protected-access  (two writers would interleave: stop this one at once)
      self._generation = generation or self._generation

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._generation is not None:
      self._cas(None, self._generation)  # a lock taken over meanwhile stays its new holder's
      self._generation = None


_HELD: dict[str, int] = {}  # workdir -> nesting depth in this process (train.run holds it around govern + train)


@contextlib.contextmanager
def hold(workdir: str, *, stale_after_s: float = 120.0) -> Iterator[None]:
  """Holds the workdir's lock for the run (process 0 takes it; every process gets its outcome)."""
  key = paths.resolve(workdir)
  if _HELD.get(key):
    _HELD[key] += 1
    try:
      yield
    finally:
      _HELD[key] -= 1
    return
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      paths.makedirs(workdir)
      lock = WorkdirLock(workdir, stale_after_s=stale_after_s)
      lock.acquire()
    except WorkdirLocked as e:
      error, lock = e, None
  multihost.raise_if_any_process_failed(error)
  _HELD[key] = 1
  try:
    yield
  finally:
    del _HELD[key]
    if lock is not None:
      lock.release()
