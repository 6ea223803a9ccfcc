"""Device mesh + logical axis rules -> shardings (t5x `partitioning.py`, without t5x).

Every parameter and key activation carries logical axis names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`). One rules table maps logical names to mesh axes; the shardings of
the whole train state are derived from the abstract state (`jax.eval_shape` ->
`nn.get_partition_spec` -> `nn.logical_to_mesh_sharding`), never written per parameter.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kard_jax.errors import InputError

LogicalAxisRules = Sequence[tuple[str, Any]]
PyTree = Any

DATA_AXIS = "data"
MODEL_AXIS = "model"
REPLICA_AXIS = "replica"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape: `data` x `model` (plus `replica` across slices). One size may be -1 (fill).

    `replica` > 1 builds a hybrid mesh for multi-slice TPU pods (data parallel across slices,
    over DCN); the batch is then split over ('replica', 'data').
    """

    data: int = -1
    model: int = 1
    replica: int = 1

    def axis_names(self) -> tuple[str, ...]:
        return (REPLICA_AXIS, DATA_AXIS, MODEL_AXIS) if self.replica != 1 else (DATA_AXIS, MODEL_AXIS)

    def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
        """The mesh shape (in `axis_names()` order) with a -1 filled from `num_devices`."""
        sizes = [self.replica, self.data, self.model] if self.replica != 1 else [self.data, self.model]
        names = self.axis_names()
        if sizes.count(-1) > 1:
            raise InputError("at most one mesh axis may be -1", field="MeshConfig")
        for name, size in zip(names, sizes):
            if size == 0 or size < -1:
                raise InputError(f"mesh axis {name!r} has size {size}; use a positive size or -1", field="MeshConfig")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise InputError(
                    f"cannot fill the -1 mesh axis: {num_devices} devices are not divisible by {known} "
                    f"(the product of the other axes {dict(zip(names, sizes))})",
                    field="MeshConfig",
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise InputError(
                f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices but {num_devices} are available",
                field="MeshConfig",
            )
        return tuple(sizes)

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """A mesh over `devices` (default: all of `jax.devices()`), topology-aware on TPU."""
        from jax.experimental import mesh_utils

        devices = list(jax.devices() if devices is None else devices)
        shape = self.resolved_shape(len(devices))
        names = self.axis_names()
        if self.replica != 1 and len({getattr(d, "slice_index", 0) for d in devices}) > 1:
            device_array = mesh_utils.create_hybrid_device_mesh(
                (1,) + shape[1:], (shape[0],) + (1,) * (len(shape) - 1), devices
            )
        else:
            try:
                device_array = mesh_utils.create_device_mesh(shape, devices)
            except (ValueError, NotImplementedError, AssertionError):  # unusual topologies: plain order
                device_array = np.asarray(devices).reshape(shape)
        return Mesh(device_array, names, axis_types=(AxisType.Auto,) * len(names))


def standard_logical_axis_rules(
    additional_rules: LogicalAxisRules = (),
    *,
    parameter_partitioning_dims: int = 1,
    activation_partitioning_dims: int = 1,
) -> tuple[tuple[str, Any], ...]:
    """t5x's default table: batch over data, vocab/mlp/heads over model, the rest replicated.

    `parameter_partitioning_dims=2` additionally shards parameters' `embed` over `data`
    (FSDP / ZeRO-3); `activation_partitioning_dims=2` shards activations' `embed` over `model`.
    `additional_rules` are placed first, so they take precedence (flax uses the first match).
    """
    if parameter_partitioning_dims not in (1, 2) or activation_partitioning_dims not in (1, 2):
        raise InputError("partitioning dims must be 1 or 2", field="standard_logical_axis_rules")
    batch = (REPLICA_AXIS, DATA_AXIS)
    rules: list[tuple[str, Any]] = [
        ("batch", batch),
        ("vocab", MODEL_AXIS),
        ("mlp", MODEL_AXIS),
        ("heads", MODEL_AXIS),
        ("kv", None),
        ("joined_kv", MODEL_AXIS),
        ("relpos_buckets", None),
        ("abspos_buckets", None),
        ("length", None),
        ("layers", None),
        ("stack", None),
        ("mlp_activations", None),
    ]
    if parameter_partitioning_dims == 2:
        rules.append(("embed", DATA_AXIS))
    elif activation_partitioning_dims == 2:
        rules.append(("embed", MODEL_AXIS))
    rules.append(("embed", None))
    return tuple(additional_rules) + tuple(rules)


def data_parallel_logical_axis_rules(additional_rules: LogicalAxisRules = ()) -> tuple[tuple[str, Any], ...]:
    """Pure data parallelism: the batch is split over every mesh axis; all parameters replicated."""
    replicated = ("vocab", "mlp", "heads", "kv", "joined_kv", "relpos_buckets", "abspos_buckets", "length",
                  "layers", "stack", "mlp_activations", "embed")
    return tuple(additional_rules) + (("batch", (REPLICA_AXIS, DATA_AXIS, MODEL_AXIS)),) + tuple(
        (name, None) for name in replicated
    )


def fsdp_logical_axis_rules(additional_rules: LogicalAxisRules = ()) -> tuple[tuple[str, Any], ...]:
    """FSDP: parameters' `embed` dimension sharded over `data` (plus tensor parallel over `model`)."""
    return standard_logical_axis_rules(additional_rules, parameter_partitioning_dims=2)


def tensor_parallel_logical_axis_rules(additional_rules: LogicalAxisRules = ()) -> tuple[tuple[str, Any], ...]:
    """Megatron-style tensor parallelism over `model` (the t5x default table)."""
    return standard_logical_axis_rules(additional_rules)


def rules_for_mesh(rules: LogicalAxisRules, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """Drop mesh axes the mesh does not have (e.g. `replica` on one slice) and size-1 axes."""
    present = {name for name, size in mesh.shape.items() if size > 1}

    def keep(target):
        if target is None:
            return None
        if isinstance(target, str):
            return target if target in present else None
        kept = tuple(t for t in target if t in present)
        return kept[0] if len(kept) == 1 else (kept or None)

    return tuple((logical, keep(target)) for logical, target in rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def path_str(path: tuple) -> str:
    """'encoder/layers_0/mlp/wi_0/kernel' for a jax key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_mesh_specs(logical_specs: PyTree, rules: LogicalAxisRules) -> PyTree:
    """Logical PartitionSpecs -> mesh PartitionSpecs (leaves that are not specs become P())."""

    def convert(spec):
        if not isinstance(spec, PartitionSpec):
            return PartitionSpec()
        return nn.logical_to_mesh_axes(tuple(spec), rules)

    return jax.tree.map(convert, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def validate_divisibility(abstract: PyTree, mesh_specs: PyTree, mesh: Mesh, logical_specs: PyTree | None = None,
                          what: str = "parameter") -> None:
    """Raise InputError naming the leaf path and axis when a dimension does not divide its mesh axes."""
    flat_shapes = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_logical = (
        jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
        if logical_specs is not None else [None] * len(flat_specs)
    )
    for (path, leaf), spec, logical in zip(flat_shapes, flat_specs, flat_logical):
        shape = getattr(leaf, "shape", ())
        for dim, entry in enumerate(tuple(spec)):
            axes = _mesh_axes(entry)
            size = math.prod(mesh.shape[a] for a in axes)
            if size > 1 and shape[dim] % size:
                logical_name = (
                    f"logical axis {tuple(logical)[dim]!r} -> " if isinstance(logical, PartitionSpec) else ""
                )
                raise InputError(
                    f"{what} {path_str(path)!r} dimension {dim} has size {shape[dim]}, not divisible by "
                    f"{logical_name}mesh axis {'x'.join(axes)!r} of size {size} (mesh {dict(mesh.shape)})",
                    field=path_str(path),
                )


def shardings_from_logical_specs(
    abstract: PyTree, logical_specs: PyTree, mesh: Mesh, rules: LogicalAxisRules, what: str = "parameter"
) -> PyTree:
    """NamedShardings for `abstract` (a tree of arrays / ShapeDtypeStructs) from its logical specs.

    Scalars and leaves without logical names are replicated. Validates divisibility first.
    """
    rules = rules_for_mesh(rules, mesh)
    mesh_specs = logical_to_mesh_specs(logical_specs, rules)
    validate_divisibility(abstract, mesh_specs, mesh, logical_specs, what)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def logical_specs_like_params(tree: PyTree, params: PyTree, param_specs: PyTree) -> PyTree:
    """Logical specs for an optimizer state: every subtree shaped like `params` inherits their names.

    Leaves with the parameter's shape take its spec; factored statistics (Adafactor's row/column
    second moments, the parameter's shape with one dimension dropped) take the spec without the
    dropped dimension; everything else (counters, placeholders) is replicated.
    """
    params_def = jax.tree.structure(params)
    flat_params = jax.tree.leaves(params)
    flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

    def spec_for(leaf, param, spec: PartitionSpec) -> PartitionSpec:
        shape, pshape = tuple(getattr(leaf, "shape", ())), tuple(param.shape)
        names = tuple(spec) + (None,) * (len(pshape) - len(tuple(spec)))
        if shape == pshape:
            return PartitionSpec(*names)
        if len(shape) == len(pshape) - 1:
            for drop in range(len(pshape) - 1, -1, -1):
                if shape == pshape[:drop] + pshape[drop + 1:]:
                    return PartitionSpec(*(names[:drop] + names[drop + 1:]))
        return PartitionSpec()

    def is_param_shaped(x) -> bool:
        try:
            return jax.tree.structure(x) == params_def and len(flat_params) > 0
        except Exception:
            return False

    def convert(sub):
        if is_param_shaped(sub):
            leaves = jax.tree.leaves(sub)
            return jax.tree.unflatten(params_def, [spec_for(l, p, s) for l, p, s in zip(leaves, flat_params, flat_specs)])
        return jax.tree.map(lambda _: PartitionSpec(), sub)

    return jax.tree.map(convert, tree, is_leaf=is_param_shaped)


def batch_sharding(mesh: Mesh, rules: LogicalAxisRules, ndim: int = 2) -> NamedSharding:
    """Inputs are sharded along their first dimension by the `batch` rule, the rest replicated."""
    batch_axes = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules_for_mesh(rules, mesh))
    return NamedSharding(mesh, batch_axes)


def batch_axis_size(mesh: Mesh, rules: LogicalAxisRules) -> int:
    """How many ways the batch dimension is split."""
    spec = nn.logical_to_mesh_axes(("batch",), rules_for_mesh(rules, mesh))
    return math.prod(mesh.shape[a] for a in _mesh_axes(tuple(spec)[0] if len(tuple(spec)) else None))


def validate_batch(batch_shapes: Mapping[str, Sequence[int]], mesh: Mesh, rules: LogicalAxisRules,
                   microbatches: int = 1) -> None:
    """Every feature's (global) batch dimension must split over the data axes and into microbatches."""
    ways = batch_axis_size(mesh, rules)
    for key, shape in batch_shapes.items():
        n = shape[0]
        if n % microbatches:
            raise InputError(f"batch size {n} of feature {key!r} is not divisible by {microbatches} microbatches",
                             field=key)
        if (n // microbatches) % ways:
            raise InputError(
                f"batch size {n} of feature {key!r} ({microbatches} microbatch(es) of {n // microbatches}) is not "
                f"divisible by the data axis size {ways} (mesh {dict(mesh.shape)})",
                field=key,
            )
