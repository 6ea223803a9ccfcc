"""Token-level losses (t5x `losses.py`): weighted cross-entropy with label smoothing and z-loss."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_with_logits(logits: Array, soft_targets: Array, z_loss: float = 0.0) -> tuple[Array, Array]:
    """Per-position cross-entropy against (soft) targets plus `z_loss * log(Z)**2`.

    Returns (total loss, z-loss part), both [...] (the vocab axis reduced), in float32.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    z = z_loss * jnp.square(log_z)
    return log_z - jnp.sum(soft_targets * logits, axis=-1) + z, z


def _smoothed_target_logit(logits: Array, targets: Array, confidence: float, low_confidence: float) -> Array:
    """sum_v soft_target[v] * logits[v] without materialising the one-hot (a gather + a sum)."""
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if low_confidence == 0.0:
        return confidence * target_logit
    return (confidence - low_confidence) * target_logit + low_confidence * jnp.sum(logits, axis=-1)


class WeightedLoss(NamedTuple):
    """Sums over every position (weighted), so microbatches and hosts can be combined exactly."""

    loss_sum: Array  # sum of weight * (cross-entropy + z-loss)
    z_loss_sum: Array  # sum of weight * z-loss
    weight_sum: Array  # sum of weights (the number of target tokens)
    correct_sum: Array  # sum of weight * [argmax == target]


def weighted_cross_entropy(
    logits: Array,
    targets: Array,
    weights: Array | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> WeightedLoss:
    """t5x `compute_weighted_cross_entropy`: [b, t, v] logits, [b, t] int targets, [b, t] weights.

    With label smoothing, the target distribution puts `1 - label_smoothing` on the target and
    spreads the rest over the other tokens; the loss is shifted by the entropy of that
    distribution so that a perfect prediction scores 0 (as in t5x).
    """
    if logits.ndim != targets.ndim + 1:
        raise ValueError(f"logits {logits.shape} must have one more dimension than targets {targets.shape}")
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = (1.0 - confidence) / (vocab - 1)
    normalizing_constant = -(
        confidence * jnp.log(confidence) + (vocab - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
    ) if label_smoothing > 0 else 0.0
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    z = z_loss * jnp.square(log_z)
    loss = log_z - _smoothed_target_logit(logits, targets, confidence, low_confidence) + z
    loss = loss - normalizing_constant
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return WeightedLoss(
        loss_sum=jnp.sum(loss * w), z_loss_sum=jnp.sum(z * w), weight_sum=jnp.sum(w), correct_sum=jnp.sum(correct * w)
    )


def safe_divide(numerator: Array, denominator: Array) -> Array:
    """numerator / denominator, 0 where the denominator is 0 (an all-padding batch)."""
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def token_mean_cross_entropy(
    logits: Array, targets: Array, weights: Array | None = None, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> Array:
    """The weighted mean over target tokens of the per-token loss."""
    r = weighted_cross_entropy(logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)
    return safe_divide(r.loss_sum, r.weight_sum)
