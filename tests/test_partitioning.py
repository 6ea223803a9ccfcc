"""Mesh construction, logical-axis rules and sharding derivation (8 fake CPU devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from kard_jax.errors import InputError
from kard_jax.training import optimizers, partitioning
from kard_jax.training.train_state import StateInitializer


class TinyMLP(nn.Module):
    """Two dense layers + a norm scale, every parameter carrying logical axis names."""

    d_model: int = 16
    d_ff: int = 32

    @nn.compact
    def __call__(self, x):
        w1 = self.param("wi", nn.with_logical_partitioning(nn.initializers.normal(0.1), ("embed", "mlp")),
                        (self.d_model, self.d_ff))
        w2 = self.param("wo", nn.with_logical_partitioning(nn.initializers.normal(0.1), ("mlp", "embed")),
                        (self.d_ff, self.d_model))
        scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (self.d_model,))
        h = nn.with_logical_constraint(jax.nn.relu(x @ w1), ("batch", "mlp"))
        return (h @ w2) * scale


def _init(module, d_model=16):
    return lambda rng: module.init(rng, jnp.ones((2, d_model)))["params"]


def test_mesh_config_fills_minus_one_and_validates():
    assert partitioning.MeshConfig(data=-1, model=2).resolved_shape(8) == (4, 2)
    assert partitioning.MeshConfig(data=2, model=-1).resolved_shape(8) == (2, 4)
    assert partitioning.MeshConfig(data=-1, model=2, replica=2).resolved_shape(8) == (2, 2, 2)
    mesh = partitioning.MeshConfig(data=-1, model=4).make_mesh()
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert mesh.devices.size == 8
    with pytest.raises(InputError, match="not divisible by 3"):
        partitioning.MeshConfig(data=-1, model=3).make_mesh()
    with pytest.raises(InputError, match="needs 4 devices but 8"):
        partitioning.MeshConfig(data=2, model=2).make_mesh()
    with pytest.raises(InputError, match="at most one"):
        partitioning.MeshConfig(data=-1, model=-1).resolved_shape(8)


def test_standard_rules_match_t5x_and_variants():
    ordered = partitioning.standard_logical_axis_rules()
    first = {}
    for name, target in ordered:
        first.setdefault(name, target)
    assert first["batch"] == ("replica", "data")
    assert first["vocab"] == first["mlp"] == first["heads"] == "model"
    assert first["embed"] is None and first["kv"] is None and first["length"] is None
    assert first["relpos_buckets"] is None
    fsdp_first = {}
    for name, target in partitioning.fsdp_logical_axis_rules():
        fsdp_first.setdefault(name, target)
    assert fsdp_first["embed"] == "data" and fsdp_first["mlp"] == "model"
    dp_first = dict(partitioning.data_parallel_logical_axis_rules())
    assert all(v is None for k, v in dp_first.items() if k != "batch")
    extra = partitioning.standard_logical_axis_rules(additional_rules=(("mlp", None),))
    assert extra[0] == ("mlp", None)


def test_rules_for_mesh_drops_missing_axes():
    mesh = partitioning.MeshConfig(data=4, model=2).make_mesh()
    rules = dict(partitioning.rules_for_mesh(partitioning.standard_logical_axis_rules(), mesh))
    assert rules["batch"] == "data"  # 'replica' is not in the mesh
    mesh81 = partitioning.MeshConfig(data=8, model=1).make_mesh()
    assert dict(partitioning.rules_for_mesh(partitioning.standard_logical_axis_rules(), mesh81))["mlp"] is None


@pytest.mark.parametrize(
    "mesh_shape, rules_fn, expected_wi",
    [
        ((4, 2), partitioning.standard_logical_axis_rules, P(None, "model")),
        ((4, 2), partitioning.fsdp_logical_axis_rules, P("data", "model")),
        ((8, 1), partitioning.data_parallel_logical_axis_rules, P(None, None)),
    ],
)
def test_state_shardings_come_from_abstract_state(mesh_shape, rules_fn, expected_wi):
    mesh = partitioning.MeshConfig(data=mesh_shape[0], model=mesh_shape[1]).make_mesh()
    init = StateInitializer(_init(TinyMLP()), optimizers.adamw(1e-3).tx, mesh, rules_fn())
    sh = init.shardings
    assert sh.params["wi"].spec == expected_wi
    assert sh.params["wo"].spec == P(*reversed(tuple(expected_wi)))
    assert sh.step.spec == P()
    # AdamW moments follow their parameter; the counter (scalar) is replicated.
    flat = jax.tree_util.tree_flatten_with_path(sh.opt_state)[0]
    by_path = {partitioning.path_str(p): s for p, s in flat}
    mu_wi = [s for p, s in by_path.items() if p.endswith("mu/wi")]
    assert mu_wi and all(s.spec == expected_wi for s in mu_wi)
    counts = [s for p, s in by_path.items() if p.endswith("count")]
    assert counts and all(s.spec == P() for s in counts)
    # In-place init lands every leaf on its derived sharding, with the right shapes.
    state = init.from_scratch(jax.random.PRNGKey(0))
    assert state.params["wi"].sharding.spec == expected_wi
    assert state.params["wi"].shape == (16, 32)
    shard_shape = state.params["wi"].addressable_shards[0].data.shape
    expected_shard = tuple(
        d // (np.prod([mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax)]) if ax else 1)
        for d, ax in zip((16, 32), tuple(expected_wi))
    )
    assert shard_shape == expected_shard


def test_adafactor_factored_statistics_drop_the_reduced_axis():
    mesh = partitioning.MeshConfig(data=4, model=2).make_mesh()
    tx = optimizers.adafactor(1e-2, min_dim_size_to_factor=8).tx
    init = StateInitializer(_init(TinyMLP()), tx, mesh, partitioning.fsdp_logical_axis_rules())
    abstract = init.abstract_state.opt_state
    flat_sh = jax.tree_util.tree_flatten_with_path(init.shardings.opt_state)[0]
    flat_ab = jax.tree.leaves(abstract)
    seen = {}
    for (path, s), a in zip(flat_sh, flat_ab):
        name = partitioning.path_str(path)
        if name.endswith("/wi"):
            seen[(name.rsplit("/", 2)[-2], a.shape)] = s.spec
    # wi is [16 embed, 32 mlp]: v_row keeps 'embed' (drops mlp), v_col keeps 'mlp'.
    assert seen[("v_row", (16,))] == P("data")
    assert seen[("v_col", (32,))] == P("model")
    state = init.from_scratch(jax.random.PRNGKey(0))
    assert int(state.step) == 0


def test_indivisible_parameter_names_path_and_axis():
    mesh = partitioning.MeshConfig(data=2, model=4).make_mesh()
    with pytest.raises(InputError) as e:
        StateInitializer(_init(TinyMLP(d_model=16, d_ff=6)), optax.sgd(0.1), mesh,
                         partitioning.standard_logical_axis_rules())
    msg = str(e.value)
    assert "'wi'" in msg and "'mlp'" in msg and "'model'" in msg and "size 6" in msg and "size 4" in msg


def test_batch_validation_names_feature_and_data_axis():
    mesh = partitioning.MeshConfig(data=4, model=2).make_mesh()
    rules = partitioning.standard_logical_axis_rules()
    partitioning.validate_batch({"x": (8, 3)}, mesh, rules)
    with pytest.raises(InputError, match=r"feature 'x'.*data axis size 4"):
        partitioning.validate_batch({"x": (6, 3)}, mesh, rules)
    with pytest.raises(InputError, match="3 microbatches"):
        partitioning.validate_batch({"x": (8, 3)}, mesh, rules, microbatches=3)
    with pytest.raises(InputError, match=r"2 microbatch\(es\) of 4.*data axis size 8"):
        partitioning.validate_batch({"x": (8, 3)}, mesh, partitioning.data_parallel_logical_axis_rules(),
                                    microbatches=2)


def test_activation_constraints_follow_rules_inside_jit():
    """The logical constraint on the hidden activation resolves to ('data', 'model') in the HLO."""
    mesh = partitioning.MeshConfig(data=4, model=2).make_mesh()
    rules = partitioning.rules_for_mesh(partitioning.standard_logical_axis_rules(), mesh)
    module = TinyMLP()
    init = StateInitializer(_init(module), optax.sgd(0.1), mesh, rules)
    state = init.from_scratch(jax.random.PRNGKey(0))
    x = jnp.ones((8, 16))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hlo = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(state.params, x).as_text()
    assert 'sharding_constraint %1 <@mesh, [{"data"}, {"model"}]>' in hlo
