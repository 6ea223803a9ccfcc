"""The train state (step, params, optimizer state) and its sharded, in-place initialisation."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec

from kard_jax.training import partitioning

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds about the model; plain arrays (no boxes, no functions)."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: PyTree
    opt_state: PyTree

    @classmethod
    def create(cls, params: PyTree, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def apply_gradients(self, grads: PyTree, tx: optax.GradientTransformation) -> "TrainState":
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def state_logical_specs(abstract_state: TrainState, param_logical_specs: PyTree) -> TrainState:
    """Logical PartitionSpecs for the whole state; optimizer statistics follow their parameter."""
    return TrainState(
        step=PartitionSpec(),
        params=param_logical_specs,
        opt_state=partitioning.logical_specs_like_params(
            abstract_state.opt_state, abstract_state.params, param_logical_specs
        ),
    )


class StateInitializer:
    """Derives the state's shardings from its abstract shape and initialises it in place.

    `init_params(rng)` returns boxed variables' `params` (flax `nn.Partitioned` leaves). Nothing
    is materialised on the host: `jax.eval_shape` gives shapes and logical axes, then
    `jit(init, out_shardings=...)` creates every shard directly on its devices.
    """

    def __init__(
        self,
        init_params: Callable[[jax.Array], PyTree],
        tx: optax.GradientTransformation,
        mesh: Mesh,
        rules: partitioning.LogicalAxisRules,
    ):
        self.init_params = init_params
        self.tx = tx
        self.mesh = mesh
        self.rules = partitioning.rules_for_mesh(rules, mesh)
        boxed = jax.eval_shape(init_params, jax.random.PRNGKey(0))
        self.param_logical_specs = nn.get_partition_spec(boxed)
        self.abstract_state = jax.eval_shape(lambda: TrainState.create(nn.meta.unbox(boxed), tx))
        logical = state_logical_specs(self.abstract_state, self.param_logical_specs)
        self.shardings: TrainState = TrainState(
            step=partitioning.replicated(mesh),
            params=partitioning.shardings_from_logical_specs(
                self.abstract_state.params, logical.params, mesh, self.rules, "parameter"
            ),
            opt_state=partitioning.shardings_from_logical_specs(
                self.abstract_state.opt_state, logical.opt_state, mesh, self.rules, "optimizer state"
            ),
        )

    @property
    def sharded_abstract_state(self) -> TrainState:
        """ShapeDtypeStructs carrying the target shardings (what a checkpoint restores into)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.shardings
        )

    def from_scratch(self, rng: jax.Array) -> TrainState:
        def init(rng):
            return TrainState.create(nn.meta.unbox(self.init_params(rng)), self.tx)

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return jax.jit(init, out_shardings=self.shardings)(rng)

    def from_params(self, params: PyTree) -> TrainState:
        """A fresh state (step 0, new optimizer state) around given params, resharded to the mesh."""
        check_params_match(params, self.abstract_state.params)
        params = jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), params,
                              self.abstract_state.params)
        params = jax.device_put(params, self.shardings.params)
        with jax.set_mesh(self.mesh):
            return jax.jit(lambda p: TrainState.create(p, self.tx), out_shardings=self.shardings)(params)


def check_params_match(params: PyTree, expected: PyTree) -> None:
    """Raise ValueError naming the first parameter whose path, shape or dtype differs."""
    got = {partitioning.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {partitioning.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"initial params do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, w in want.items():
        g = got[name]
        if tuple(g.shape) != tuple(w.shape):
            raise ValueError(f"initial param {name!r} has shape {tuple(g.shape)}, the model expects {tuple(w.shape)}")

