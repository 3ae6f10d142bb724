"""Orbax checkpoints: async save, keep N, restore onto any mesh, refuse incompatible models.

Checkpoints are written as global sharded arrays (OCDBT), not per-device files, so a state
saved on one mesh restores onto another: the restore target is an abstract tree of
`jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(new_mesh, spec))`.

When: `CheckpointStore.should_save(step)` is orbax's `CheckpointManager.should_save` with
`save_interval_steps` (train.checkpoint_every) and `save_on_steps` (the last step), plus the
step at which a preemption notice is agreed (oclear_jax/distributed/preemption.py), after which
`stop_if_preempted` waits for the write and ends the run.

Several processes: every process calls every method (saves and restores are collective; each
process writes and reads the shards it holds). Atomicity: orbax writes each step into a
temporary directory and renames it when complete, so a save cut off by preemption never looks
like a checkpoint (its leftovers are cleaned up on the next start). A finalized step that still
cannot be read (a truncated file, a lost shard) by any one process is unreadable for all: process
0 alone moves it aside to `<dir>.broken/`, every process learns that before any of them tries the
previous step, and the previous step is restored instead.

One restore path for parameters: what serves a run (index, search, embed, the evaluators) reads
only the model's parameters, `params/encoder`, with `restore_model_params` (a read-only store's
`restore_params`); the class centres and the optimizer state are neither read nor allocated, so a
run trained on any classes embeds a catalogue with other labels. The same broken-step fallback
applies, except that a reader skips an unreadable step rather than moving it (see `read_only`).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
from etils import epath

from oclear_jax.distributed import multihost
from input_pipeline import paths
from oclear_jax.distributed import preemption as preemption_lib


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model; it is left untouched."""


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    flat[key] = (tuple(leaf.shape), str(leaf.dtype))
  return flat


def _describe_mismatch(saved: dict, wanted: dict) -> str:
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  if missing:
    return f"the model has {missing[0]} {wanted[missing[0]]} which the checkpoint lacks ({len(missing)} such arrays)"
  if extra:
    return f"the checkpoint has {extra[0]} {saved[extra[0]]} which the model lacks ({len(extra)} such arrays)"
  for key in sorted(wanted):
    if saved[key][0] != wanted[key][0]:
      return f"{key} has shape {saved[key][0]} in the checkpoint but {wanted[key][0]} in the model"
  return ""


def shape_mismatch(saved_tree: Any, wanted_tree: Any) -> str:
  """'' if the two trees hold the same arrays with the same shapes, else the first difference in words."""
  return _describe_mismatch(_flat_shapes(saved_tree), _flat_shapes(wanted_tree))


MODEL_PARAMS = ("params", "encoder")  # where a train state keeps the model's own parameters


class CheckpointStore:
  """A thin, opinionated wrapper over `ocp.CheckpointManager` for one train state.

  `save_interval_steps`/`save_on_steps` decide `should_save` (None: save whatever step is given);
  `preemption` (a PreemptionNotice) adds the preempted step to them and enables `stop_if_preempted`.

  `read_only`: a reader beside a run that may be writing (serving, a notebook, a test comparing
  runs). It creates, cleans up, moves and deletes nothing, and cannot save.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
               save_interval_steps: int | None = None, save_on_steps: tuple[int, ...] = (),
               preemption: preemption_lib.PreemptionNotice | None = None, read_only: bool = False):
    self.directory = orbax_directory(directory)
    self.read_only = read_only
    # The handler is named up front: a fresh manager on an existing directory must be able to
    # read item metadata (for the compatibility check) before any save or restore. A reader
    # neither creates the directory nor removes the temporary folder of a save in flight
    # (orbax's own read_only=True does the same but logs two warnings per restore).
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            save_decision_policy=_save_policy(save_interval_steps, save_on_steps)))
    self._preemption = preemption
    self._closed = False
    self.broken: list[tuple[int, str]] = []  # (step, reason) of unreadable checkpoints set aside (or skipped)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Every process asks at every step (the preemption notice is agreed collectively)."""
    if self._preemption is not None and self._preemption.reached(step):
      latest = self.latest_step()
      return latest is None or latest < step
    return self._manager.should_save(step)

  def item_metadata(self, step: int) -> Any:
    """The tree of arrays (shapes and dtypes, nothing read) that checkpoint `step` holds."""
    return self._manager.item_metadata(step).tree

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only; it cannot save step {step}")
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def stop_if_preempted(self, step: int) -> None:
    """After a preemption notice: wait until the save of `step` is on disk, then raise `Preempted`."""
    if self._preemption is None or not self._preemption.reached(step):
      return
    self.close()
    logging.info("Preempted at step %d; its checkpoint is written", step)
    raise preemption_lib.Preempted(step, self.directory, self._preemption.signame)

  def check_compatible(self, step: int, abstract_state: Any, *, params_only: bool = False) -> None:
    saved = self.item_metadata(step)
    if params_only:
      for key in MODEL_PARAMS:
        saved = saved.get(key, {}) if isinstance(saved, dict) else {}
    problem = shape_mismatch(saved, abstract_state)
    if problem and params_only:
      raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} holds another model's parameters: {problem}. Pass the run's "
          f"own config (omit --config to use {os.path.dirname(self.directory)}/config.json)")
    if problem:
      raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} belongs to a different model: {problem}. "
          f"It was left untouched; use a new --workdir (or delete {self.directory}) to start afresh")

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, int] | tuple[None, None]:
    """Restores `step` (default: the latest readable one) onto the shardings of `abstract_state`.

    An incompatible checkpoint (another model) stops with `IncompatibleCheckpointError`; an
    unreadable one is set aside (see `self.broken`) and the next older step is tried. Every process
    gets the same answer, whichever of them failed to read its share.
    """
    return self._restore_first_readable(step, lambda candidate: self._try_read(candidate, abstract_state))

  def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int] | tuple[None, None]:
    """`restore`, of the model's parameters only (`params/encoder`) onto `abstract_params`' shardings.

    A partial read: the checkpoint's other arrays (class centres, optimizer moments, step) are
    neither read nor allocated, and their shapes are not checked (any number of classes will do).
    """
    return self._restore_first_readable(
        step, lambda candidate: self._try_read(candidate, abstract_params, params_only=True))

  def _restore_first_readable(self, step: int | None, read) -> tuple[Any, int] | tuple[None, None]:
    steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [step]
    for candidate in steps:
      state, error = read(candidate)
      # Another model is an error on every process; an explicit step that cannot be read too.
      multihost.raise_if_any_process_failed(error if isinstance(error, IncompatibleCheckpointError) else None)
      if step is not None:
        multihost.raise_if_any_process_failed(error)
      failures = multihost.process_failures(error)
      if not failures:
        return state, candidate
      index, kind, message = failures[0]
      reason = " ".join(f"process {index}: {kind.rpartition('.')[2]}: {message}".split())[:240]  # one line
      if self.read_only:
        self._skip(candidate, reason)
      else:
        self._set_aside(candidate, reason)
    return None, None

  def _try_read(self, step: int, target: Any, *, params_only: bool = False) -> tuple[Any, Exception | None]:
    """(state, None), or (None, why this process could not read `step`): never raises, never waits.

    The handler is called directly, not `CheckpointManager.restore`: that one ends in a barrier,
    where the processes that read their shards would wait forever for one that failed to.
    `params_only`: `target` is the model's parameters, read alone (PyTree's partial restore).
    """
    absl_logger, level = logging.getLogger("absl"), logging.getLogger("absl").level
    absl_logger.setLevel(logging.CRITICAL)  # orbax logs a torn file's contents; our one warning says it
    try:
      self.check_compatible(step, target, params_only=params_only)
      logging.info("Restoring checkpoint %s/%d%s", self.directory, step, " (model parameters)" * params_only)
      path = ocp.step.find_step_path(self.directory, ocp.step.standard_name_format(), step=step) / _ITEM
      if not params_only:
        handler, args = ocp.StandardCheckpointHandler(), ocp.args.StandardRestore(target)
      else:
        item = functools.reduce(lambda tree, key: {key: tree}, reversed(MODEL_PARAMS), target)
        handler, args = ocp.PyTreeCheckpointHandler(), ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)
      try:
        restored = handler.restore(path, args=args)
      finally:
        handler.close()
      return (functools.reduce(lambda tree, key: tree[key], MODEL_PARAMS, restored) if params_only else restored), None
    except Exception as e:  # pylint: disable=broad-except  (any read failure means "torn"; shared by restore)
      return None, e
    finally:
      absl_logger.setLevel(level)

  def _set_aside(self, step: int, reason: str) -> None:
    """Process 0 moves `step` to `<dir>.broken/` (once); every process then sees it gone."""
    target = multihost.run_on_process_zero(_move_aside, self.directory, step)
    self._manager.reload()
    self.broken.append((step, reason.splitlines()[0][:300]))
    logging.info("Checkpoint step %d is unreadable (%s); process 0 moved it to %s; trying an older one", step,
                    reason, target or f"{self.directory}.broken/")

  def _skip(self, step: int, reason: str) -> None:
    """A reader's answer to an unreadable step: leave it where it is and try an older one.

    Not `_set_aside`: a reader may run beside the training run that owns the directory, whose
    manager lists, keeps and deletes steps there (and whose own restore sets broken steps aside);
    a reader moving a step would change the writer's view under it, and a step that looks torn
    to a reader on another host may only be one whose files have not reached it yet. Skipping
    leaves the workdir exactly as the reader found it, and the next reader decides afresh.
    """
    self.broken.append((step, reason.splitlines()[0][:300]))
    logging.info("Checkpoint step %d is unreadable (%s); left in place; trying an older one", step, reason)

  def report_broken(self, resumed_step: int | None) -> None:
    """One warning line per step set aside (or skipped), on stderr (where a user looks when a run resumes early)."""
    for broken_step, reason in self.broken:
      if self.read_only:
        print(f"warning: checkpoint step {broken_step} in {self.directory} is unreadable ({reason}); left in place; "
              f"restored step {resumed_step} instead", file=sys.stderr)
      else:
        print(f"warning: checkpoint step {broken_step} was unreadable ({reason}); set aside in "
              f"{self.directory}.broken/; resumed from step {resumed_step or 0}", file=sys.stderr)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a save in flight; safe to call twice."""
    if self._closed:
      return
    self._closed = True
    self._manager.wait_until_finished()
    self._manager.close()
    if self._preemption is not None:
      self._preemption.close()


def train_store(workdir: str, train: Any) -> CheckpointStore:
  """The training run's store: saves every train.checkpoint_every steps, at the last, and when preempted."""
  return CheckpointStore(os.path.join(workdir, "checkpoints"), max_to_keep=train.keep_checkpoints,
                         async_save=train.async_checkpoints, save_interval_steps=train.checkpoint_every,
                         save_on_steps=(train.num_steps,),
                         preemption=preemption_lib.PreemptionNotice(agree_every=train.log_every))


_ITEM = "default"  # the CheckpointManager's folder of its single item inside each step


def restore_model_params(directory: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """(the model's parameters of checkpoint `step` (default: the latest readable one), its step).

  What serving reads (serving/trained_run.py): `params/encoder` alone, onto the shardings of
  `abstract_params` (a tree of `jax.ShapeDtypeStruct`), through a read-only store: an unreadable
  step is skipped with a warning, never moved. A collective on N processes, like `restore`.
  """
  if not paths.isdir(orbax_directory(directory)):
    raise FileNotFoundError(f"no checkpoint in {directory}; train first (--mode=train)")
  store = CheckpointStore(directory, read_only=True)
  try:
    steps = store.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}; train first (--mode=train)")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint step {step} in {directory} (steps there: {steps})")
    params, restored = store.restore_params(abstract_params, step)
  finally:
    store.close()
  if params is None:
    raise FileNotFoundError(f"no readable checkpoint in {directory}: steps {[s for s, _ in store.broken]} are "
                            f"unreadable ({store.broken[0][1]})")
  store.report_broken(restored)
  return params, int(restored)


def orbax_directory(directory: str | os.PathLike) -> str:
  """The folder orbax reads and writes: an absolute local path (orbax wants one), or a URL such as
  gs://bucket/run/checkpoints as given. Every checkpoint reader and writer goes through here."""
  return paths.resolve(directory)


def _save_policy(every: int | None, steps: tuple[int, ...]):
  """Orbax's default policy minus its save at the first step of a fresh run; None: orbax's default.

  The default (`save_interval_steps`) would also write a full checkpoint at step 1 of every new run,
  a pod-sized write of a state worth nothing. Preemption saves stay in (orbax's policy for JAX's
  preemption sync); the single-process SIGTERM flag is added by `CheckpointStore.should_save`.
  """
  if every is None:
    return None
  policies = ocp.checkpoint_managers
  return policies.AnySavePolicy([policies.FixedIntervalPolicy(every)] * (every > 0) + [
      policies.SpecificStepsPolicy(tuple(steps)), policies.PreemptionCheckpointingPolicy()])


def _move_aside(directory: str, step: int) -> str:
  """Moves `<directory>/<step>` to `<directory>.broken/<step>` (`<step>.1`, ... if set aside before)."""
  broken_dir = epath.Path(f"{directory}.broken")
  broken_dir.mkdir(parents=True, exist_ok=True)
  target, n = broken_dir / str(step), 0
  while target.exists():
    n += 1
    target = broken_dir / f"{step}.{n}"
  (epath.Path(directory) / str(step)).rename(target)
  return os.fspath(target)


def best_checkpoint_dir(workdir: str) -> str:
  """Where a run keeps the one checkpoint it selected on its validation split (train/evals.py)."""
  return os.path.join(workdir, "checkpoints_best")


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Attaches shardings to an eval_shape tree (eval_shape drops them) to make a restore target.

  A parameter masked out of one optimizer (optax.partition's MaskedNode: no array) keeps its
  MaskedNode; its sharding (derived from the boxed parameter) is dropped.
  """
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree.map(
      lambda leaf, sharding: leaf if masked(leaf) else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_tree, shardings, is_leaf=masked)
