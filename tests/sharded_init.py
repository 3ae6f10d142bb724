"""Creates a model's variables already sharded on a (4, 2) mesh, as the trainer does (tests only)."""
import flax.linen as nn
import jax

from oclear_jax import sharding


def init_sharded(model: nn.Module, args, rules):
  """(mesh, variables): `model.init(rng, *args)` jitted with the rules' shardings on ('data', 'model')."""
  mesh = sharding.make_mesh((4, 2))

  def init(rng):
    return model.init({"params": rng}, *args)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = sharding.tree_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, rules)
    variables = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(jax.random.key(0))
  return mesh, variables
