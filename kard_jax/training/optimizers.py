"""Optimizers (optax) with learning-rate schedules, global-norm clipping and weight-decay masks."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kard_jax.errors import InputError
from kard_jax.training.partitioning import path_str

Schedule = Callable[[Any], Any]
PyTree = Any

SCHEDULES = ("constant", "linear_warmup", "rsqrt", "cosine")
# Parameter-path fragments that never get weight decay (norm scales, biases).
NO_DECAY_FRAGMENTS = ("norm", "scale", "bias")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation and its learning-rate schedule (logged each step)."""

    tx: optax.GradientTransformation
    learning_rate: Schedule


def make_schedule(
    name: str = "constant",
    *,
    learning_rate: float = 1e-4,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    end_value: float = 0.0,
) -> Schedule:
    """step -> learning rate; `learning_rate` is always the peak value.

    constant: `learning_rate` throughout (the KARD paper: AdamW at 1e-4).
    linear_warmup: 0 -> peak linearly over `warmup_steps`, then constant.
    rsqrt: t5x inverse square root: peak for the first `warmup_steps`, then
      peak * sqrt(warmup_steps / step).
    cosine: linear warmup, then cosine decay to `end_value` at `decay_steps` (total steps).
    """
    if name not in SCHEDULES:
        raise InputError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}", field="make_schedule.name")
    if warmup_steps < 0:
        raise InputError(f"warmup_steps must be >= 0, got {warmup_steps}", field="make_schedule.warmup_steps")
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name == "linear_warmup":
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.linear_schedule(0.0, learning_rate, warmup_steps)
    if name == "rsqrt":
        warm = max(warmup_steps, 1)

        def rsqrt(step):
            return learning_rate * jnp.sqrt(warm / jnp.maximum(jnp.asarray(step, jnp.float32), warm))

        return rsqrt
    if decay_steps is None or decay_steps <= warmup_steps:
        raise InputError(
            f"cosine schedule needs decay_steps > warmup_steps, got {decay_steps} <= {warmup_steps}",
            field="make_schedule.decay_steps",
        )
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, decay_steps, end_value)


def _as_schedule(learning_rate: float | Schedule) -> Schedule:
    return learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)


def default_weight_decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies: matrices, but not norm scales or biases (any 1-D param)."""

    def decays(path, leaf) -> bool:
        name = path_str(path).lower()
        return getattr(leaf, "ndim", 0) >= 2 and not any(f in name for f in NO_DECAY_FRAGMENTS)

    return jax.tree_util.tree_map_with_path(decays, params)


def _with_clipping(tx: optax.GradientTransformation, clip_norm: float | None) -> optax.GradientTransformation:
    if clip_norm is None or clip_norm <= 0 or math.isinf(clip_norm):
        return tx
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx)


def adamw(
    learning_rate: float | Schedule = 1e-4,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    weight_decay_mask: Callable[[PyTree], PyTree] | None = default_weight_decay_mask,
) -> Optimizer:
    """AdamW (the KARD paper: constant 1e-4; Hugging Face Trainer defaults otherwise)."""
    schedule = _as_schedule(learning_rate)
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
    return Optimizer(_with_clipping(tx, clip_norm), schedule)


def adafactor(
    learning_rate: float | Schedule | None = None,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    momentum: float | None = None,
    weight_decay_rate: float | None = None,
    clip_norm: float | None = None,
    weight_decay_mask: Callable[[PyTree], PyTree] | None = default_weight_decay_mask,
) -> Optimizer:
    """Adafactor with t5x defaults (factored second moments, decay 0.8, update clipping 1.0).

    The default learning rate is t5x's: rsqrt decay with peak 0.01 over 10k warmup steps.
    """
    schedule = _as_schedule(
        learning_rate if learning_rate is not None else make_schedule("rsqrt", learning_rate=0.01, warmup_steps=10_000)
    )
    tx = optax.adafactor(
        schedule, min_dim_size_to_factor=min_dim_size_to_factor, decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale, clipping_threshold=clipping_threshold,
        momentum=momentum, weight_decay_rate=weight_decay_rate, factored=factored,
        weight_decay_mask=weight_decay_mask if weight_decay_rate else None,
    )
    return Optimizer(_with_clipping(tx, clip_norm), schedule)
