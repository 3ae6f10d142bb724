"""Several processes as one run: joining them, exchanging Python values, one host's failure a failure on all.

`initialize_distributed` joins this process to the others (`jax.distributed.initialize`) from
main.py's flags or from JAX's own cluster detection (TPU VM slices, SLURM, Open MPI), and leaves a
plain machine single-process.

`gather_objects` is the one way Python values cross processes (pickled bytes through
`multihost_utils.process_allgather`): outcomes here, rows and shapes in `distributed/host_gather.py`.

`raise_if_any_process_failed` and `run_on_process_zero` are for steps that can fail on one host
(process 0 validating a catalogue and writing records, any host reading its share): every process
learns every outcome *before* anyone waits in a barrier, and raises the same exception type and
message, so each prints the same one `error:` line (main.py) and exits. Without it the failing host
exits alone and the others sit in `sync_global_devices` until a heartbeat timeout minutes later,
with the reason in one host's log only.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

DISTRIBUTED_MODES = ("auto", "on", "off")
_T = TypeVar("_T")


class HostError(RuntimeError):
  """Another process failed with an exception this process cannot rebuild by type."""


# ------------------------------------------------------------------ joining the processes

def detected_cluster() -> str | None:
  """The multi-process cluster JAX's own detection would use (TPU VM slice, SLURM, Open MPI, ...), else None.

  `jax.distributed.initialize()` with no arguments fails on a plain machine, so 'auto' asks first.
  A detected cluster of one process (one TPU VM host, a single SLURM task running the tests)
  counts as none: such runs stay single-process and never bind a coordinator port.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  try:  # JAX's detectors: exactly the environments `initialize()` understands, in its order.
    from jax._src import clusters  # pylint: disable=g-import-not-at-top  (private, optional: guarded)
    cluster_types = [c for c in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
                     if not c.opt_in_only_method]
  except (ImportError, AttributeError):  # a JAX that moved them: the environment variables they read
    several = (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "OMPI_MCA_orte_hnp_uri" in os.environ
               or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
               or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ)
    return "environment" if several else None
  for cluster in cluster_types:
    if cluster.is_env_present():  # JAX takes the first one present
      try:
        count = cluster.get_process_count()
      except Exception:  # pylint: disable=broad-except  (initialize() will say what is wrong)
        return cluster.__name__
      return cluster.__name__ if count > 1 else None
  return None


def initialize_distributed(mode: str = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins this process to the others of a multi-process run; True when it is (now or already) joined.

  mode 'auto': with any explicit argument, initialize with them (JAX's detection fills the rest);
  else, where JAX detects a cluster of several processes, `jax.distributed.initialize()`; else stay
  single-process (a laptop, the tests). 'on': always initialize. 'off': never. Must run before
  anything touches a JAX device.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {DISTRIBUTED_MODES}")
  explicit = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                    process_id=process_id).items() if v is not None}
  if mode == "off":
    if explicit:
      raise ValueError(f"--distributed=off contradicts --{', --'.join(explicit)}; drop one or the other")
    return False
  if jax.distributed.is_initialized():
    return True
  if mode == "auto" and not explicit and detected_cluster() is None:
    return False
  if mode == "auto" and num_processes == 1 and coordinator_address is None:
    return False  # one process by request: nobody to join
  # Cross-process collectives on CPU (several processes on one machine, CPU hosts) need an
  # implementation; gloo ships with jaxlib. It concerns the CPU backend only, so TPU/GPU hosts are
  # unaffected; a user's choice of 'mpi' is kept.
  if jax.config.jax_cpu_collectives_implementation in (None, "gloo"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**explicit)
  except ValueError as e:  # JAX detected no cluster and the flags do not describe one
    given = ", ".join(f"{k}={v!r}" for k, v in explicit.items())
    raise ValueError(f"jax.distributed.initialize({given}) failed: {e} Pass --coordinator_address=HOST:PORT "
                     f"(process 0's), --num_processes and --process_id on every process, or --distributed=off "
                     f"for one process") from e
  logging.info("process %d of %d joined via %s", jax.process_index(), jax.process_count(),
               explicit.get("coordinator_address") or detected_cluster())
  return True


# ------------------------------------------------------------------ values across processes

def gather_objects(value: Any) -> list[Any]:
  """`value` of every process, in process order; a collective (every process calls it, in the same order).

  Any picklable value, of any size and a different size on each process. Pickled bytes travel, not
  arrays: JAX would turn int64/float64 into 32 bits (x64 off), and strings, ragged counts and
  messages have no array form; pickle is exact for all of them. With one process: `[value]`.
  """
  if jax.process_count() == 1:
    return [value]
  payload = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(payload)], np.int32))).reshape(-1)
  # Padded to a power of two: the gather compiles once per size, not once per payload.
  padded = np.zeros(max(256, 1 << (int(sizes.max()) - 1).bit_length()), np.uint8)
  padded[:len(payload)] = payload
  stacked = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [pickle.loads(stacked[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


# ------------------------------------------------------------------ one outcome for all processes

def _outcome(error: BaseException | None) -> tuple[str, str] | None:
  """(type path "module.Qualname", message) of a failure, None for success: what `process_failures` gathers.

  Not the exception itself: not every exception pickles, and the other processes only rebuild it.
  """
  if error is None:
    return None
  kind = type(error)
  return f"{kind.__module__}.{kind.__qualname__}", str(error)


def _rebuild(kind: str, message: str) -> Exception:
  """The same exception type with the same message where this process knows the type, else a HostError.

  Only modules this process has already imported are looked in: nothing is imported by name.
  """
  parts, cls = kind.split("."), None
  for split in range(len(parts) - 1, 0, -1):  # the longest imported module of "pkg.mod.Class.Inner"
    owner = sys.modules.get(".".join(parts[:split]))
    if owner is not None:
      cls = owner
      for name in parts[split:]:
        cls = getattr(cls, name, None)
      break
  if isinstance(cls, type) and issubclass(cls, Exception):
    try:
      rebuilt = cls(message)
      if str(rebuilt) == message:
        return rebuilt
    except Exception:  # pylint: disable=broad-except  (a constructor that wants other arguments)
      pass
  return HostError(f"{kind.rpartition('.')[2]}: {message}")


def process_failures(error: BaseException | None) -> list[tuple[int, str, str]]:
  """(process index, exception type path, message) of every process that failed, lowest index first.

  Every process calls it with its own exception (or None) and gets the same list: for decisions
  all processes must take alike, such as setting an unreadable checkpoint aside when only one of
  them could not read its share. A collective, and so a barrier, like `raise_if_any_process_failed`.
  Messages arrive whole, whatever their length (`gather_objects`).
  """
  outcomes = gather_objects(_outcome(error))
  return [(index, *failed) for index, failed in enumerate(outcomes) if failed is not None]


def raise_if_any_process_failed(error: BaseException | None) -> None:
  """Every process calls this with its own exception (or None); if any failed, every process raises.

  It is a collective (all processes must call it, in the same order) and so also a barrier: on
  return every process has finished the step before it. The first failed process (lowest index)
  decides the error; it re-raises its own exception (traceback intact), the others raise one of
  the same type and message.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  failures = process_failures(error)
  if not failures:
    return
  index, kind, message = failures[0]
  if index == jax.process_index():
    raise error
  logging.error("process %d failed, so process %d stops too: %s: %s", index, jax.process_index(),
                kind.rpartition(".")[2], message)
  raise _rebuild(kind, message)


def run_on_process_zero(fn: Callable[..., _T], *args, **kwargs) -> _T | None:
  """`fn(*args, **kwargs)` on process 0 only (one writer per file); its result there, None elsewhere.

  Every process must call it. A failure of `fn` is raised on every process (see
  `raise_if_any_process_failed`); on return, process 0 has finished `fn`.
  """
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (shared with every process, then raised)
      error = e
  raise_if_any_process_failed(error)
  return result
