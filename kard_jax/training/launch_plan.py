"""Launch plan: per-device parameter and optimizer-state bytes, before any device is touched.

`plan_launch` builds the train state exactly as `trainer.train` does (`StateInitializer`: the
model's init and the optimizer's init under `jax.eval_shape`, shardings from the logical-axis
rules), but over a `jax.sharding.AbstractMesh` of the requested size, so a v4-32 job can be
planned on a laptop. Nothing is allocated and no computation runs. A mesh that cannot shard a
dimension raises `InputError` naming the parameter, the dimension and the mesh axis, the same
error the trainer would raise once the slice is up; a state that cannot fit `device_memory_bytes`
raises too. `main --dry_run` prints the plan for `trainer.train` jobs.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from kard_jax.errors import InputError
from kard_jax.training import optimizers, partitioning
from kard_jax.training.train_state import StateInitializer

PyTree = Any
GIB = 2**30
MIB = 2**20
PREFIX = "kard_jax: launch plan:"


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Bytes of the train state, globally and on the most loaded device, for one mesh."""

    mesh_shape: Mapping[str, int]
    num_devices: int
    num_params: int
    param_dtypes: Mapping[str, int]  # dtype name -> number of parameter elements
    param_bytes: int  # global (one copy)
    param_bytes_per_device: int
    opt_state_bytes: int
    opt_state_bytes_per_device: int
    microbatches: int
    # (logical axis, mesh axes) -> number of parameter dimensions sharded that way (all divide).
    sharded_dims: Mapping[tuple[str, str], int]
    num_param_arrays: int
    replicated_param_arrays: int
    replicated_param_bytes: int
    device_memory_bytes: int | None = None

    @property
    def grad_bytes_per_device(self) -> int:
        """Gradients have the parameters' shapes, dtypes and shardings; microbatching adds an accumulator."""
        return self.param_bytes_per_device * (2 if self.microbatches > 1 else 1)

    @property
    def state_bytes_per_device(self) -> int:
        return self.param_bytes_per_device + self.opt_state_bytes_per_device

    @property
    def total_bytes_per_device(self) -> int:
        """Parameters + optimizer state + gradients (activations and XLA temporaries not included)."""
        return self.state_bytes_per_device + self.grad_bytes_per_device

    def lines(self) -> list[str]:
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        dtypes = ", ".join(f"{k}: {v:,}" for k, v in self.param_dtypes.items())
        sharded = ", ".join(f"{logical}->{axes} x{n}" for (logical, axes), n in sorted(self.sharded_dims.items()))
        out = [
            f"{PREFIX} mesh {mesh} ({self.num_devices} devices, abstract: no device memory used)",
            f"{PREFIX} parameters: {self.num_params:,} ({dtypes}) = {self.param_bytes} bytes in all; "
            f"per device {self.param_bytes_per_device} bytes ({_human(self.param_bytes_per_device)})",
            f"{PREFIX} optimizer state: {self.opt_state_bytes} bytes in all; "
            f"per device {self.opt_state_bytes_per_device} bytes ({_human(self.opt_state_bytes_per_device)})",
            f"{PREFIX} gradients (the parameters' shardings{', x2 with the microbatch accumulator' if self.microbatches > 1 else ''}): "
            f"per device {self.grad_bytes_per_device} bytes ({_human(self.grad_bytes_per_device)})",
            f"{PREFIX} per device: parameters + optimizer state = {self.state_bytes_per_device} bytes "
            f"({_human(self.state_bytes_per_device)}); with gradients {self.total_bytes_per_device} bytes "
            f"({_human(self.total_bytes_per_device)}); activations come on top",
            f"{PREFIX} sharding: {self.num_param_arrays - self.replicated_param_arrays} of {self.num_param_arrays} "
            f"parameter arrays sharded, every sharded dimension divides its mesh axis"
            + (f" ({sharded})" if sharded else "")
            + f"; {self.replicated_param_arrays} replicated ({_human(self.replicated_param_bytes)})",
        ]
        if self.device_memory_bytes is not None:
            left = self.device_memory_bytes - self.total_bytes_per_device
            out.append(f"{PREFIX} device memory {_human(self.device_memory_bytes)}: {_human(left)} left for "
                       f"activations and temporaries")
        return out


def _human(n: int) -> str:
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def abstract_mesh(mesh_config: partitioning.MeshConfig, num_devices: int) -> AbstractMesh:
    """The mesh `mesh_config.make_mesh()` would build over `num_devices` devices, without devices."""
    shape = mesh_config.resolved_shape(num_devices)
    names = mesh_config.axis_names()
    return AbstractMesh(tuple(shape), names, axis_types=(AxisType.Auto,) * len(names))


def default_init_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Smallest inputs that build every parameter (T5 parameter shapes do not depend on lengths)."""
    from kard_jax.models.reranker import RerankerModel

    if isinstance(model, RerankerModel):
        return {"query_tokens": (1, 4), "candidate_tokens": (1, 2, 4)}
    return {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}


def _per_device_bytes(abstract: PyTree, shardings: PyTree) -> tuple[int, int]:
    """(global bytes, bytes of one device's shards) of a tree of ShapeDtypeStructs."""
    total = per_device = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        itemsize = np.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.shape) * itemsize
        per_device += math.prod(sharding.shard_shape(leaf.shape)) * itemsize
    return total, per_device


def plan_launch(
    model: Any,
    optimizer: optimizers.Optimizer | None = None,
    mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
    logical_axis_rules: partitioning.LogicalAxisRules | None = None,
    *,
    num_devices: int | None = None,
    microbatches: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    device_memory_bytes: int | None = None,
) -> LaunchPlan:
    """The memory plan of `trainer.train(model=..., optimizer=..., mesh_config=..., ...)`.

    Defaults are `trainer.train`'s (AdamW 1e-4, t5x's standard rules). `num_devices` defaults to
    `jax.device_count()`. Raises InputError when a sharded dimension does not divide its mesh axis
    (naming the parameter and the axis) or when the state and gradients exceed `device_memory_bytes`.
    """
    from kard_jax.training.trainer import _model_from  # the same model coercion as train()

    model = _model_from(model)
    optimizer = optimizer or optimizers.adamw()
    rules = partitioning.standard_logical_axis_rules() if logical_axis_rules is None else logical_axis_rules
    num_devices = jax.device_count() if num_devices is None else int(num_devices)
    if num_devices < 1:
        raise InputError(f"the plan needs at least one device, got {num_devices}", field="plan_devices")
    mesh = abstract_mesh(mesh_config, num_devices)
    shapes = {k: tuple(v) for k, v in (input_shapes or default_init_shapes(model)).items()}
    # The trainer's own initializer: same eval_shape of init + optimizer, same rules, same checks.
    initializer = StateInitializer(
        lambda rng: model.get_initial_variables(rng, shapes)["params"], optimizer.tx, mesh, rules
    )
    state, shardings = initializer.abstract_state, initializer.shardings
    param_bytes, param_per_device = _per_device_bytes(state.params, shardings.params)
    opt_bytes, opt_per_device = _per_device_bytes(state.opt_state, shardings.opt_state)

    dtypes: Counter = Counter()
    sharded: Counter = Counter()
    replicated_arrays = replicated_bytes = 0
    flat_params = jax.tree.leaves(state.params)
    flat_shardings = jax.tree.leaves(shardings.params)
    flat_logical = jax.tree.leaves(initializer.param_logical_specs,
                                   is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
    for leaf, sharding, logical in zip(flat_params, flat_shardings, flat_logical):
        dtypes[np.dtype(leaf.dtype).name] += math.prod(leaf.shape)
        logical_names = tuple(logical) if isinstance(logical, PartitionSpec) else ()
        any_sharded = False
        for dim, entry in enumerate(tuple(sharding.spec)):
            axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
            if axes and math.prod(mesh.shape[a] for a in axes) > 1:
                any_sharded = True
                name = logical_names[dim] if dim < len(logical_names) and logical_names[dim] else "?"
                sharded[(name, "x".join(axes))] += 1
        if not any_sharded:
            replicated_arrays += 1
            replicated_bytes += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize

    plan = LaunchPlan(
        mesh_shape={k: int(v) for k, v in mesh.shape.items()},
        num_devices=num_devices,
        num_params=sum(dtypes.values()),
        param_dtypes=dict(dtypes),
        param_bytes=param_bytes,
        param_bytes_per_device=param_per_device,
        opt_state_bytes=opt_bytes,
        opt_state_bytes_per_device=opt_per_device,
        microbatches=microbatches,
        sharded_dims=dict(sharded),
        num_param_arrays=len(flat_params),
        replicated_param_arrays=replicated_arrays,
        replicated_param_bytes=replicated_bytes,
        device_memory_bytes=device_memory_bytes,
    )
    if device_memory_bytes is not None and plan.total_bytes_per_device > device_memory_bytes:
        raise InputError(
            f"the train state does not fit: parameters + optimizer state + gradients need "
            f"{_human(plan.total_bytes_per_device)} per device (before activations) but a device has "
            f"{_human(device_memory_bytes)} (mesh {dict(plan.mesh_shape)}); use more devices, FSDP "
            f"(partitioning/fsdp.gin), tensor parallelism or Adafactor",
            field="mesh_config",
        )
    return plan
