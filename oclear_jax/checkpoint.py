"""Orbax checkpoints: async save, keep N, restore onto any mesh, refuse incompatible models.

Checkpoints are written as global sharded arrays (OCDBT), not per-device files, so a state
saved on one mesh restores onto another: the restore target is an abstract tree of
`jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(new_mesh, spec))`.

Atomicity: orbax writes each step into a temporary directory and renames it when complete, so
a save cut off by preemption never looks like a checkpoint (its leftovers are cleaned up on the
next start). A finalized step that still cannot be read (a truncated file, a lost shard) is
moved aside to `<dir>.broken/` and reported, and the previous step is restored instead.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp


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


class CheckpointStore:
  """A thin, opinionated wrapper over `ocp.CheckpointManager` for one train state."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    # The handler is named up front: a fresh manager on an existing directory must be able to
    # read item metadata (for the compatibility check) before any save or restore.
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))
    self.broken: list[tuple[int, str]] = []  # (step, reason) of unreadable checkpoints set aside

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    problem = shape_mismatch(self._manager.item_metadata(step).tree, abstract_state)
    if problem:
      raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} belongs to a different model: {problem}. "
          f"It was left untouched; use a new --workdir (or delete {self.directory}) to start afresh")

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, int] | tuple[None, None]:
    """Restores `step` (default: the latest readable one) onto the shardings of `abstract_state`.

    An incompatible checkpoint (another model) stops with `IncompatibleCheckpointError`; an
    unreadable one is set aside (see `self.broken`) and the next older step is tried.
    """
    steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [step]
    for candidate in steps:
      try:
        self.check_compatible(candidate, abstract_state)
        logging.info("Restoring checkpoint %s/%d", self.directory, candidate)
        state = self._manager.restore(candidate, args=ocp.args.StandardRestore(abstract_state))
        return state, candidate
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read failure means "torn")
        if step is not None:
          raise
        self._set_aside(candidate, f"{type(e).__name__}: {e}")
    return None, None

  def _set_aside(self, step: int, reason: str) -> None:
    broken_dir = f"{self.directory}.broken"
    os.makedirs(broken_dir, exist_ok=True)
    target = os.path.join(broken_dir, str(step))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    self.broken.append((step, reason.splitlines()[0][:300]))
    logging.warning("Checkpoint step %d is unreadable (%s); moved to %s, trying an older one", step, reason, target)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def best_checkpoint_dir(workdir: str) -> str:
  """Where a run keeps the one checkpoint it selected on its validation split (train_eval.py)."""
  return os.path.join(workdir, "checkpoints_best")


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Attaches shardings to an eval_shape tree (eval_shape drops them) to make a restore target."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_tree, shardings)
