"""One process of tests/test_preemption.py's 2-process checks (started by `python -m oclear_jax.distributed.launch`).

On a state sharded over both processes' devices it checks, collectively, what a pod relies on and
prints one `RESULT {json}` line:
- a torn latest step (every data file cut in half by process 0) is set aside once and both
  processes restore the step before it;
- a step only process 1 cannot read (its read fails, process 0's succeeds) is set aside too, by
  process 0 alone, and both restore the step before it instead of one waiting in a barrier;
- process 1 alone gets SIGTERM: JAX's preemption sync picks one step, both save it and stop.
Then it exits with the preempted exit code, as main.py does.
"""
import argparse
import json
import os
import pathlib
import signal
import sys
import time

import numpy as np

from oclear_jax.distributed import launch

STEPS = 2000  # the preemption loop's bound: JAX's sync lands about a second after the signal


def _state(mesh, value: float):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3) + value
  return {"step": jax.device_put(np.int32(value), NamedSharding(mesh, P())),
          "w": jax.make_array_from_callback(full.shape, NamedSharding(mesh, P(("data", "model"))),
                                            lambda index: full[index])}


def _first_value(state) -> float:
  """The state's `step` scalar (replicated: every process holds it)."""
  return float(np.asarray(state["step"].addressable_data(0)))


def _cut_in_half(step_dir: str) -> int:
  files = [p for p in pathlib.Path(step_dir).rglob("*") if p.is_file() and p.stat().st_size > 64]
  for path in files:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  return len(files)


def _set_aside_checks(mesh, root: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from oclear_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from oclear_jax.distributed import multihost  # pylint: disable=g-import-not-at-top
  directory = os.path.join(root, "ckpt")
  store = checkpoint.CheckpointStore(directory, async_save=False)
  for step in (1, 2, 3):
    store.save(step, _state(mesh, step), force=True)
  store.close()
  cut = multihost.run_on_process_zero(_cut_in_half, os.path.join(directory, "3"))
  target = checkpoint.abstract_with_shardings(jax.eval_shape(lambda: _state(mesh, 0)),
                                              jax.tree.map(lambda a: a.sharding, _state(mesh, 0)))
  store = checkpoint.CheckpointStore(directory)
  torn_state, torn_step = store.restore(target)
  torn_broken = [s for s, _ in store.broken]
  store.close()

  store = checkpoint.CheckpointStore(directory)
  real_read = store._try_read  # pylint: disable=protected-access

  def process_one_cannot_read_two(step, abstract):
    if step == 2 and jax.process_index() == 1:
      return None, OSError("shard 5 of step 2: unexpected end of file")
    return real_read(step, abstract)
  store._try_read = process_one_cannot_read_two  # pylint: disable=protected-access
  one_state, one_step = store.restore(target)
  one_broken = store.broken
  store.close()
  return dict(cut=cut, torn_step=torn_step, torn_value=_first_value(torn_state), torn_broken=torn_broken,
              one_step=one_step, one_value=_first_value(one_state), one_broken=[s for s, _ in one_broken],
              one_reason=one_broken[0][1] if one_broken else "",
              aside=sorted(os.listdir(f"{directory}.broken")), left=sorted(os.listdir(directory)))


def _preemption_check(mesh, root: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from oclear_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from oclear_jax.distributed import preemption  # pylint: disable=g-import-not-at-top
  directory = os.path.join(root, "preempt")
  store = checkpoint.CheckpointStore(directory, save_interval_steps=500, save_on_steps=(STEPS,),
                                     preemption=preemption.PreemptionNotice())
  state, signalled_at = _state(mesh, 0), None
  add_one = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s))
  try:
    for step in range(1, STEPS + 1):
      state = add_one(state)
      time.sleep(0.01)
      if step == 5 and jax.process_index() == 1:
        signalled_at = step
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice on one host only
      if store.should_save(step):
        store.save(step, state, force=True)
      store.stop_if_preempted(step)
    outcome = "finished"
  except preemption.Preempted as e:
    outcome = str(e)
  store.close()
  saved = checkpoint.CheckpointStore(directory)
  steps = saved.all_steps()
  saved.close()
  return dict(signalled_at=signalled_at, preempted=outcome, saved_steps=steps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--root")
  args = launch.join_from_arguments(parser)
  import jax  # pylint: disable=g-import-not-at-top
  from oclear_jax.distributed import preemption  # pylint: disable=g-import-not-at-top
  from oclear_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh((-1, 2))
  result = {"process_index": jax.process_index(), **_set_aside_checks(mesh, args.root),
            **_preemption_check(mesh, args.root)}
  print("RESULT " + json.dumps(result), flush=True)
  sys.exit(preemption.PREEMPTED_EXIT_CODE if result["preempted"].startswith("preempted:") else 0)


if __name__ == "__main__":
  main()
