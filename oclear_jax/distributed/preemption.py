"""Preemption: a SIGTERM, a Ctrl-C (SIGINT) or a cluster's maintenance notice ends training with the step in flight saved.

A preempted job gets SIGTERM and, some seconds later, SIGKILL. The loop asks `PreemptionNotice.reached(step)`
at every step boundary; once it says yes, the checkpoint store saves that step (whatever
train.checkpoint_every says), waits for the write to finish and raises `Preempted`, which main.py
turns into one line on stderr and exit code `PREEMPTED_EXIT_CODE`. Rerunning the same command
resumes from that step exactly, so a preemption costs no trained step, only the step in flight.

Ctrl-C is a preemption the user asks for: the first SIGINT is handled as SIGTERM is (on one process
the same flag; under JAX's preemption service it is passed on as a SIGTERM to this process, which
the service catches); a second SIGINT or SIGTERM ends the process at once (`os._exit(128 + signal)`),
saving nothing more: orbax renames a step into place only once complete, so no half-written
checkpoint is left visible, and the workdir lock it leaves is taken over by the next run
(distributed/workdir_lock.py: its pid is gone).

Who notices, and how every process agrees on the same step:
- several processes (`jax.distributed` with JAX's preemption service, the default): JAX catches
  SIGTERM (and, on Cloud TPU, the maintenance notice) on any host and picks one step, the same on
  all, at which `multihost_utils.reached_preemption_sync_point(step)` is true (the next step
  after the highest one any host had reached; in practice about a second of steps later). Orbax's
  `CheckpointManager.should_save` asks the same question. No Python handler is installed: it would
  replace JAX's.
- one process without `jax.distributed` (a laptop, one TPU VM host, the tests): JAX's service does
  not exist, so a Python SIGTERM handler sets a flag the loop reads at the next step boundary.
- several processes with the preemption service turned off (`jax_enable_preemption_service=False`):
  the Python flag is shared by an all-gather every `agree_every` steps, a host sync, which is
  why it is not done every step.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

# sysexits.h's EX_TEMPFAIL, "temporary failure, the user is invited to retry": the run is not
# finished, nothing is wrong, rerunning the same command resumes it. A killed process reports
# 128 + 15 instead, and a user error 2 (main.py), so a wrapper script can tell the three apart.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped at a preemption notice after `step` was saved; rerun the same command to resume."""

  def __init__(self, step: int, directory: str, signame: str = "SIGTERM"):
    self.step = step
    what = "interrupted (Ctrl-C)" if signame == "SIGINT" else "preempted"
    super().__init__(f"{what}: step {step} saved in {directory}/{step}; rerun the same command to resume "
                     f"from it (exit code {PREEMPTED_EXIT_CODE})")


def jax_preemption_sync_available() -> bool:
  """Whether JAX's preemption service runs (it does after `jax.distributed.initialize` unless turned off)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionNotice:
  """`reached(step)`: has this run been asked to stop, agreed by every process at the same step?

  Every process must call `reached` at every step, with the same steps (a collective where
  processes agree). The answer for a step is remembered, so asking twice costs nothing.
  """

  def __init__(self, *, agree_every: int = 1):
    self._agree_every = max(int(agree_every), 1)
    self._jax_sync = jax_preemption_sync_available()
    self._signalled = False
    self.signame = "SIGTERM"  # the first signal's name, for the closing line
    self._previous_handlers: dict[int, object] = {}
    self._last: tuple[int | None, bool] = (None, False)
    if threading.current_thread() is not threading.main_thread():  # Python only lets the main thread
      logging.warning("not the main thread: SIGTERM will not save a checkpoint before the process ends")
      return
    # Under JAX's service SIGTERM stays JAX's; SIGINT is ours either way.
    for signum in (signal.SIGINT,) if self._jax_sync else SIGNALS:
      self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame  # only a flag: the loop saves at its next step boundary, outside the handler
    if self._signalled:  # the second one: stop now, saving nothing more
      print(f"{signal.Signals(signum).name} again: exiting at once; the last complete checkpoint stays",
            file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access  (no teardown: tf.data threads may hang it)
    self._signalled = True
    self.signame = signal.Signals(signum).name
    if signum == signal.SIGINT:
      print("Ctrl-C: saving the step in flight, then stopping (Ctrl-C again: exit at once without saving)",
            file=sys.stderr, flush=True)
    if self._jax_sync:  # JAX's preemption service agrees the step with the other processes
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if self._last[0] != step:
      self._last = (step, self._ask(step))
    return self._last[1]

  def _ask(self, step: int) -> bool:
    if self._jax_sync:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() == 1:
      return self._signalled
    if step % self._agree_every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(self._signalled))))

  def close(self) -> None:
    """Gives SIGTERM back to whoever had it (by default: end the process)."""
    if threading.current_thread() is not threading.main_thread():
      return  # Python refuses; the handler only sets a flag nobody reads any more
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}
