"""The student's train state: one dataclass pytree, donated to the jitted step.

The teacher is not in it: teacher params are a separate, non-donated argument of the step and
have no optimizer state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from marjax.train.mesh import ShardingRules, param_shardings, replicated

__all__ = ["TrainState", "init_state", "state_shardings", "abstract_state"]


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    step: jax.Array        # int32 (): optimizer updates applied so far
    params: Any            # float32 master params
    opt_state: Any
    rng: jax.Array         # uint32 (2,) raw PRNG key (raw, so Orbax saves it as a plain array)


def state_shardings(state_or_shapes: TrainState, mesh: Mesh, rules: Optional[ShardingRules] = None) -> TrainState:
    """Params and the optimizer moments that mirror them share the same rules (the logical names
    come from field paths); step and rng are replicated."""
    rep = replicated(mesh)
    return TrainState(step=rep, params=param_shardings(state_or_shapes.params, mesh, rules),
                      opt_state=param_shardings(state_or_shapes.opt_state, mesh, rules), rng=rep)


def init_state(params, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh,
               rules: Optional[ShardingRules] = None) -> TrainState:
    """A fresh state, materialised sharded. `params` must already be placed (shard_params)."""
    def make(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                          rng=jax.random.PRNGKey(seed))
    shapes = jax.eval_shape(make, params)
    # jit may forward `params` unchanged into the state: callers that keep their own params
    # alive pass a copy (shard_params(copy=True)), since the step donates the state.
    return jax.jit(make, out_shardings=state_shardings(shapes, mesh, rules))(params)


def abstract_state(state: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the shardings (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
