"""Flax (linen) T5 encoder-decoder: T5 v1.1 / Flan-T5 and the original T5.

Follows `t5x/examples/t5/network.py` in structure (parameter names, logical axes) and
Hugging Face `modeling_t5` in numerics, so weights move between the two exactly:

* no 1/sqrt(d_kv) attention scaling (it is folded into the query initialisation),
* RMSNorm computed in float32 without mean subtraction,
* one learned relative-position bias per stack (bidirectional buckets in the encoder,
  causal buckets in the decoder), shared by all layers of that stack,
* gated-GELU ("gelu_new", tanh approximation) MLP with an untied lm_head for v1.1 / Flan-T5,
  ReLU MLP with tied embeddings and a d_model**-0.5 output rescale for the original T5.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the key
activations carry `nn.with_logical_constraint`, so one rules table in
`kard_jax.training.partitioning` decides the sharding (t5x `partitioning.py`).

`T5Config.scan_layers` runs each stack's layers under `nn.scan` (t5x `scan_layers`; with
`nn.remat` inside when `remat_policy='full'`): the layer parameters (and decoding caches) are
stacked on a leading axis with the logical name 'layers' (replicated by every rules table) under
`encoder/layers/...` instead of `encoder/layers_0/...`. The numerics are the same; HF
import/export convert between the layouts (`stack_layers` / `unstack_layers`), while orbax
checkpoints store the layout the model was trained with (as t5x does) and restoring into the
other layout is refused with the fix named (`checkpoints.layer_layout_hint`).

Incremental decoding uses a "cache" collection (t5x style): self-attention keys/values are
written at the current position; the encoder-decoder attention keys/values are computed from the
encoder output once, on the first decoding step (which adds them to the cache), and only read
afterwards. With n samples per input the decoder runs b * n rows against the encoder output of
the b inputs, and those K/V are cached once per input, not once per sample.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
Initializer = Callable[..., Array]

NEG_INF = -1e10  # additive mask value; exp() underflows to exactly 0 in float32 like HF's finfo.min


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture hyper-parameters; field names follow Hugging Face's `T5Config`."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "gated-gelu" (v1.1 / Flan-T5) or "relu" (original T5)
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # activation / matmul dtype ("bfloat16" on TPU)
    param_dtype: str = "float32"
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    remat_policy: str = "none"  # "none" or "full" (recompute each layer in the backward pass)
    # Scan over each stack's layers with `nn.scan` (t5x `scan_layers`): one compiled layer body
    # per stack instead of one per layer, so large/XL compile in a fraction of the time. The
    # layer parameters are then stacked on a leading 'layers' axis (`encoder/layers/...`,
    # shape [num_layers, ...]) instead of `encoder/layers_0/...`; HF import/export convert.
    scan_layers: bool = False

    def __post_init__(self):
        if self.feed_forward_proj not in ("gated-gelu", "relu"):
            raise ValueError(
                f"T5Config.feed_forward_proj must be 'gated-gelu' or 'relu', got {self.feed_forward_proj!r}"
            )
        if self.remat_policy not in ("none", "full"):
            raise ValueError(f"T5Config.remat_policy must be 'none' or 'full', got {self.remat_policy!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raise early on a typo

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "T5Config":
        return preset_config(name, **overrides)

    def num_params(self) -> int:
        """Parameter count (what MFU estimates use)."""
        d, h, kv, ff, v = self.d_model, self.num_heads, self.d_kv, self.d_ff, self.vocab_size
        attn = 4 * d * h * kv
        mlp = (3 if self.is_gated else 2) * d * ff
        enc = self.num_encoder_layers * (attn + mlp + 2 * d) + d
        dec = self.num_decoder_layers * (2 * attn + mlp + 3 * d) + d
        relpos = 2 * h * self.relative_attention_num_buckets
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + enc + dec + relpos + head


# T5 v1.1 / Flan-T5 shapes (google/flan-t5-*), plus a tiny one for tests and the demo.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_encoder_layers=8, num_decoder_layers=8),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_encoder_layers=12, num_decoder_layers=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_encoder_layers=24, num_decoder_layers=24),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_encoder_layers=24, num_decoder_layers=24),
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_encoder_layers=24, num_decoder_layers=24),
}


def preset_config(name: str, **overrides: Any) -> T5Config:
    """A named T5 v1.1 / Flan-T5 shape, with any field overridden (gin: `t5.preset_config.name`)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown T5 preset {name!r}; known presets: {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(T5Config)}
    if unknown:
        raise ValueError(f"Unknown T5Config field(s) {sorted(unknown)} in overrides of preset {name!r}")
    return T5Config(**{**PRESETS[name], **overrides})


def shift_right(targets: Array, decoder_start_token_id: int = 0) -> Array:
    """Decoder inputs: targets shifted one position right with the start token first."""
    shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=decoder_start_token_id)[:, :-1]
    return shifted.astype(targets.dtype)


def _normal(stddev: float) -> Initializer:
    return nn.initializers.normal(stddev=stddev)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, variance in float32."""

    epsilon: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (x.shape[-1],), self.param_dtype
        )
        x32 = jnp.asarray(x, jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.epsilon)
        return (jnp.asarray(y, self.dtype) * jnp.asarray(scale, self.dtype)).astype(self.dtype)


class DenseGeneral(nn.Module):
    """A dense layer whose kernel has named input/output dimensions (no bias, as in T5)."""

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    stddev: float
    dtype: Any
    param_dtype: Any
    contract_dims: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[-self.contract_dims:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_normal(self.stddev), self.kernel_axes),
            tuple(in_shape) + tuple(self.features),
            self.param_dtype,
        )
        kernel = jnp.asarray(kernel, self.dtype)
        x = jnp.asarray(x, self.dtype)
        n = self.contract_dims
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ())))


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """Hugging Face / Mesh TensorFlow T5 bucketing of (key position - query position)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    safe_n = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe_n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
    """Learned per-head bias over relative position buckets, shared by one stack's layers."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """Returns [1 or batch, heads, q_len, k_len] biases for the given absolute positions."""
        rel_embedding = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(_normal(1.0), ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets),
            self.param_dtype,
        )
        relative = key_positions[..., None, :] - query_positions[..., :, None]  # [.., q, k]
        bucket = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        bias = jnp.take(jnp.asarray(rel_embedding, jnp.float32), bucket, axis=1)  # [heads, .., q, k]
        bias = jnp.moveaxis(bias, 0, -3)  # [.., heads, q, k]
        return bias if bias.ndim == 4 else bias[None]


class MultiHeadAttention(nn.Module):
    """T5 attention; `decode=True` reads/writes the "cache" collection."""

    config: T5Config
    is_cross_attention: bool = False

    def _dense(self, name: str, features, axes, stddev, contract_dims=1):
        c = self.config
        return DenseGeneral(
            features=features, kernel_axes=axes, stddev=stddev, dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype), contract_dims=contract_dims, name=name,
        )

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        bias: Array | None,
        *,
        enable_dropout: bool,
        decode: bool = False,
        decode_position: Array | None = None,
    ) -> Array:
        c = self.config
        h, kv, d = c.num_heads, c.d_kv, c.d_model
        qkv_axes = ("embed", "heads", "kv")
        query = self._dense("query", (h, kv), qkv_axes, (d * kv) ** -0.5)(inputs_q)
        key_proj = self._dense("key", (h, kv), qkv_axes, d**-0.5)
        value_proj = self._dense("value", (h, kv), qkv_axes, d**-0.5)
        query = _constrain(query, ("batch", "length", "heads", "kv"))
        rows, samples = query.shape[0], 1
        if decode and self.is_cross_attention and inputs_kv.shape[0] != rows:
            # Several samples per input (self-consistency decoding): the decoder runs b * n rows,
            # rows i*n .. i*n+n-1 being the samples of input i (`decoding.flat_batch_expand`
            # order), against the encoder output of the b inputs. K/V are computed and cached
            # once per input ([b, ...]) and each input's n samples attend to them as n query
            # positions of one row, so the einsums below stay as they are.
            if rows % inputs_kv.shape[0]:
                raise ValueError(f"decoder batch {rows} is not a multiple of encoder batch {inputs_kv.shape[0]}")
            samples = rows // inputs_kv.shape[0]
            query = query.reshape(inputs_kv.shape[0], samples * query.shape[1], h, kv)
            query = _constrain(query, ("batch", "length", "heads", "kv"))

        # Default layouts (no cache): keys/values heads-major [b, heads, k, kv], like the query and
        # the output below, so that both einsums are plain batched matmuls. With keys/values and the
        # output left [b, k, heads, kv], XLA:CPU ran the weights x values product at about half the
        # speed (37 vs 19 ms at 8 x 6 heads x 512 x 512; T5-small encoder forward 1.57 -> 1.40 s).
        scores_eq, out_eq = "bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"
        kv_axes = (("batch", "heads", "length", "kv"),) * 2
        cached_layouts = False  # keys [b, heads, kv, k], values [b, heads, k, kv] (the decode caches)
        if decode and self.is_cross_attention and decode_position is not None:
            # Encoder-decoder K/V depend only on the encoder output: they enter the cache on the
            # first decoding step (computed from the real encoder output) and are only read
            # afterwards. They are stored in the layouts the two einsums read (keys [b, heads, kv, k],
            # values [b, heads, k, kv]) so that no step copies or transposes them.
            dt = jnp.dtype(c.dtype)
            key = self.variable(
                "cache", "cached_key", lambda: jnp.einsum("bkhd->bhdk", key_proj(inputs_kv).astype(dt))
            ).value
            value = self.variable(
                "cache", "cached_value", lambda: jnp.einsum("bkhd->bhkd", value_proj(inputs_kv).astype(dt))
            ).value
            scores_eq, out_eq = "bqhd,bhdk->bhqk", "bhqk,bhkd->bqhd"
            kv_axes = (("batch", "heads", "kv", "length"), ("batch", "heads", "length", "kv"))
            cached_layouts = True
        elif decode and not self.is_cross_attention:
            # The self-attention cache is kept in the layouts the two einsums read, like the
            # encoder-decoder one (keys [b, heads, kv, max_len], values [b, heads, max_len, kv]):
            # each step writes its one position in place and no step copies or transposes the
            # whole cache (on CPU that transpose was ~13 % of a small-shape decoding step).
            key = jnp.einsum("bkhd->bhdk", key_proj(inputs_kv))
            value = jnp.einsum("bkhd->bhkd", value_proj(inputs_kv))
            is_initialized = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
            scores_eq, out_eq = "bqhd,bhdk->bhqk", "bhqk,bhkd->bqhd"
            kv_axes = (("batch", "heads", "kv", "length"), ("batch", "heads", "length", "kv"))
            cached_layouts = True
            if is_initialized:
                if inputs_q.shape[1] != 1:
                    raise ValueError(f"decode=True expects one token per step, got length {inputs_q.shape[1]}")
                max_len = cached_key.value.shape[-1]
                idx = decode_position
                cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, 0, 0, idx))
                cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, 0, idx, 0))
                key, value = cached_key.value, cached_value.value
                visible = jnp.arange(max_len) <= idx  # causal mask over the cache
                step_mask = jnp.where(visible, 0.0, NEG_INF)[None, None, None, :]
                bias = step_mask if bias is None else bias + step_mask
        else:  # also the cross-attention of init_cache's shape-only pass (decode_position None)
            key = jnp.einsum("bkhd->bhkd", key_proj(inputs_kv))
            value = jnp.einsum("bkhd->bhkd", value_proj(inputs_kv))
        key = _constrain(key, kv_axes[0])
        value = _constrain(value, kv_axes[1])

        # Heads-major query and output ([b, heads, q, kv]) wherever the keys are not the per-step
        # decode caches: without a cache (above), and for shared cached cross K/V, where the samples
        # are query positions and XLA:CPU otherwise lowered the output einsum to a slow generic dot
        # (4.5 -> 2.7 ms per layer at 8 x 5 rows).
        heads_major = samples > 1 or not cached_layouts
        if heads_major:
            query = jnp.einsum("bqhd->bhqd", query)
            if cached_layouts:
                scores_eq, out_eq = "bhqd,bhdk->bhqk", "bhqk,bhkd->bhqd"
        scores = jnp.einsum(scores_eq, query, key, preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias.astype(jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1)
        if enable_dropout and c.dropout_rate > 0:
            weights = nn.Dropout(rate=c.dropout_rate)(weights, deterministic=False)
        weights = weights.astype(jnp.dtype(c.dtype))
        out = jnp.einsum(out_eq, weights, value)
        if heads_major:
            out = jnp.einsum("bhqd->bqhd", out)
        if samples > 1:  # [b, n * q, heads, kv] -> [b * n, q, heads, kv]
            out = out.reshape(rows, out.shape[1] // samples, h, kv)
        out = self._dense("out", (d,), ("heads", "kv", "embed"), (h * kv) ** -0.5, contract_dims=2)(out)
        return _constrain(out, ("batch", "length", "embed"))


class MlpBlock(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, *, enable_dropout: bool) -> Array:
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        dense = functools.partial(DenseGeneral, dtype=dt, param_dtype=pdt)
        if c.is_gated:
            gate = dense((c.d_ff,), ("embed", "mlp"), c.d_model**-0.5, name="wi_0")(x)
            linear = dense((c.d_ff,), ("embed", "mlp"), c.d_model**-0.5, name="wi_1")(x)
            hidden = jax.nn.gelu(gate, approximate=True) * linear
        else:
            hidden = jax.nn.relu(dense((c.d_ff,), ("embed", "mlp"), c.d_model**-0.5, name="wi")(x))
        hidden = _constrain(hidden, ("batch", "length", "mlp"))
        if enable_dropout and c.dropout_rate > 0:
            hidden = nn.Dropout(rate=c.dropout_rate)(hidden, deterministic=False)
        out = dense((c.d_model,), ("mlp", "embed"), c.d_ff**-0.5, name="wo")(hidden)
        return _constrain(out, ("batch", "length", "embed"))


def _norm(config: T5Config, name: str) -> RMSNorm:
    return RMSNorm(
        epsilon=config.layer_norm_epsilon, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), name=name
    )


def _dropout(config: T5Config, x: Array, enable_dropout: bool) -> Array:
    if enable_dropout and config.dropout_rate > 0:
        return nn.Dropout(rate=config.dropout_rate)(x, deterministic=False)
    return x


class EncoderLayer(nn.Module):
    config: T5Config
    scanned: bool = False  # the body of an nn.scan: return (carry, None)

    @nn.compact
    def __call__(self, x: Array, bias: Array, enable_dropout: bool) -> Array:
        c = self.config
        y = _norm(c, "pre_attention_layer_norm")(x)
        y = MultiHeadAttention(c, name="attention")(y, y, bias, enable_dropout=enable_dropout)
        x = x + _dropout(c, y, enable_dropout)
        y = _norm(c, "pre_mlp_layer_norm")(x)
        y = MlpBlock(c, name="mlp")(y, enable_dropout=enable_dropout)
        x = x + _dropout(c, y, enable_dropout)
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    config: T5Config
    scanned: bool = False  # the body of an nn.scan: return (carry, None)

    @nn.compact
    def __call__(
        self, x, encoded, self_bias, cross_bias, enable_dropout: bool, decode: bool = False, decode_position=None
    ) -> Array:
        c = self.config
        y = _norm(c, "pre_self_attention_layer_norm")(x)
        y = MultiHeadAttention(c, name="self_attention")(
            y, y, self_bias, enable_dropout=enable_dropout, decode=decode, decode_position=decode_position
        )
        x = x + _dropout(c, y, enable_dropout)
        y = _norm(c, "pre_cross_attention_layer_norm")(x)
        y = MultiHeadAttention(c, is_cross_attention=True, name="encoder_decoder_attention")(
            y, encoded, cross_bias, enable_dropout=enable_dropout, decode=decode, decode_position=decode_position
        )
        x = x + _dropout(c, y, enable_dropout)
        y = _norm(c, "pre_mlp_layer_norm")(x)
        y = MlpBlock(c, name="mlp")(y, enable_dropout=enable_dropout)
        x = x + _dropout(c, y, enable_dropout)
        return (x, None) if self.scanned else x


# The logical axis name of the stacked layer dimension of scanned parameters (and caches).
LAYERS_AXIS = "layers"


def _maybe_remat(config: T5Config, layer_cls, static_argnums):
    if config.remat_policy == "full":
        # Inside a scan the loop already keeps XLA from merging the recomputation (t5x).
        return nn.remat(layer_cls, static_argnums=static_argnums, prevent_cse=not config.scan_layers)
    return layer_cls


def _scanned(config: T5Config, layer_cls, num_layers: int, num_args: int):
    """`layer_cls` scanned `num_layers` times (t5x `scan_with_axes`): the first call argument is
    the carry, the other `num_args` are broadcast to every layer; params, caches and dropout
    rngs get a leading layer axis named LAYERS_AXIS."""
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_args,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
    )


def _padding_bias(key_tokens: Array, pad_id: int) -> Array:
    """[b, 1, 1, k] additive mask hiding padded keys."""
    return jnp.where(key_tokens != pad_id, 0.0, NEG_INF)[:, None, None, :].astype(jnp.float32)


class Encoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, enable_dropout: bool = False) -> Array:
        c = self.config
        x = self.shared_embedding(tokens)
        x = _constrain(_dropout(c, x, enable_dropout), ("batch", "length", "embed"))
        positions = jnp.arange(tokens.shape[1])
        bias = RelativePositionBiases(
            c.relative_attention_num_buckets, c.relative_attention_max_distance, c.num_heads, True,
            jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name="relpos_bias",
        )(positions, positions)
        bias = bias + _padding_bias(tokens, c.pad_token_id)
        layer_cls = _maybe_remat(c, EncoderLayer, static_argnums=(3,))
        if c.scan_layers:
            stack = _scanned(c, layer_cls, c.num_encoder_layers, num_args=2)
            x, _ = stack(c, scanned=True, name=LAYERS_AXIS)(x, bias, enable_dropout)
        else:
            for i in range(c.num_encoder_layers):
                x = layer_cls(c, name=f"layers_{i}")(x, bias, enable_dropout)
        x = _norm(c, "encoder_norm")(x)
        return _dropout(c, x, enable_dropout)


class Decoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self, encoded: Array, encoder_tokens: Array, decoder_tokens: Array, enable_dropout: bool = False, decode: bool = False
    ) -> Array:
        c = self.config
        x = _constrain(_dropout(c, self.shared_embedding(decoder_tokens), enable_dropout), ("batch", "length", "embed"))
        relpos = RelativePositionBiases(
            c.relative_attention_num_buckets, c.relative_attention_max_distance, c.num_heads, False,
            jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name="relpos_bias",
        )
        cross_bias = _padding_bias(encoder_tokens, c.pad_token_id)
        decode_position = None
        if decode:
            is_initialized = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            # The cache's key positions 0..max_decode_len-1 (its shape carries max_decode_len).
            key_positions = self.variable("cache", "key_positions", jnp.arange, decoder_tokens.shape[1])
            if is_initialized:
                decode_position = position.value
                position.value = position.value + 1
                self_bias = relpos(decode_position[None], key_positions.value)
            else:
                self_bias = None  # cache initialisation pass: shapes only (decode_position None)
        else:
            positions = jnp.arange(decoder_tokens.shape[1])
            causal = jnp.where(positions[None, :] <= positions[:, None], 0.0, NEG_INF)[None, None]
            self_bias = relpos(positions, positions) + causal
        layer_cls = _maybe_remat(c, DecoderLayer, static_argnums=(5, 6))
        if c.scan_layers:
            stack = _scanned(c, layer_cls, c.num_decoder_layers, num_args=6)
            x, _ = stack(c, scanned=True, name=LAYERS_AXIS)(
                x, encoded, self_bias, cross_bias, enable_dropout, decode, decode_position
            )
        else:
            for i in range(c.num_decoder_layers):
                x = layer_cls(c, name=f"layers_{i}")(
                    x, encoded, self_bias, cross_bias, enable_dropout, decode, decode_position
                )
        x = _norm(c, "decoder_norm")(x)
        x = _dropout(c, x, enable_dropout)
        if c.tie_word_embeddings:
            x = x * (c.d_model**-0.5)
            logits = self.shared_embedding.attend(x)
        else:
            logits = DenseGeneral(
                (c.vocab_size,), ("embed", "vocab"), c.d_model**-0.5, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype),
                name="logits_dense",
            )(x)
        return _constrain(jnp.asarray(logits, jnp.float32), ("batch", "length", "vocab"))


class Embed(nn.Module):
    """Token embedding shared by encoder and decoder (and the tied lm_head)."""

    num_embeddings: int
    features: int
    dtype: Any
    param_dtype: Any

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(_normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype,
        )

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("bld,vd->blv", x, jnp.asarray(self.embedding, self.dtype))


class T5(nn.Module):
    """The encoder-decoder network. Inputs are int token arrays padded with `pad_token_id` (0)."""

    config: T5Config

    def setup(self):
        c = self.config
        self.token_embedder = Embed(c.vocab_size, c.d_model, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
        self.encoder = Encoder(c, self.token_embedder)
        self.decoder = Decoder(c, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        return self.encoder(encoder_input_tokens, enable_dropout)

    def decode(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        enable_dropout: bool = False,
        decode: bool = False,
    ) -> Array:
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout, decode)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        encoded = self.encode(encoder_input_tokens, enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout)


def init_cache(
    model: T5, params: Any, batch_size: int, encoder_len: int, max_decode_len: int, num_decodes: int = 1
) -> Any:
    """An empty decoding cache for `T5.decode(..., decode=True)` (position 0, zero K/V).

    `batch_size` inputs with `num_decodes` decoder rows each: the self-attention cache holds
    batch_size * num_decodes rows, while `T5.decode` is then called with the encoder output and
    tokens of the batch_size inputs (the encoder-decoder K/V it caches are per input)."""
    c = model.config
    encoded = jnp.zeros((batch_size, encoder_len, c.d_model), jnp.dtype(c.dtype))
    enc_tokens = jnp.ones((batch_size, encoder_len), jnp.int32)
    dec_tokens = jnp.zeros((batch_size * num_decodes, max_decode_len), jnp.int32)

    _, variables = model.apply(
        {"params": params}, encoded, enc_tokens, dec_tokens, decode=True, method=T5.decode, mutable=["cache"]
    )
    return variables["cache"]


_LAYER_KEY = re.compile(r"layers_(\d+)")


def _stack_arrays(arrays):
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays)
    return jnp.stack(arrays)


def stack_layers(params: Any) -> Any:
    """Unscanned parameter (or cache) tree -> the scan_layers layout: in every dict holding
    `layers_0 .. layers_{n-1}`, those become one `layers` subtree whose leaves are stacked on a
    new leading axis. Other entries are untouched; a tree without `layers_i` is returned as is.
    numpy leaves stay numpy (HF import), jax arrays give jax arrays."""
    if not isinstance(params, Mapping):
        return params
    indices = sorted(int(m.group(1)) for k in params if (m := _LAYER_KEY.fullmatch(str(k))))
    out = {k: stack_layers(v) for k, v in params.items() if not _LAYER_KEY.fullmatch(str(k))}
    if indices:
        if indices != list(range(len(indices))):
            raise ValueError(f"layer keys are not layers_0..layers_{len(indices) - 1}: {indices}")
        if LAYERS_AXIS in out:
            raise ValueError("tree holds both layers_i and a stacked 'layers' entry")
        layers = [params[f"layers_{i}"] for i in indices]
        out[LAYERS_AXIS] = jax.tree.map(lambda *xs: _stack_arrays(xs), *layers)
    return out


def unstack_layers(params: Any) -> Any:
    """The inverse of `stack_layers`: every `layers` subtree (stacked on axis 0) becomes
    `layers_0 .. layers_{n-1}` (what HF export and unscanned models read)."""
    if not isinstance(params, Mapping):
        return params
    out = {}
    for key, value in params.items():
        if key == LAYERS_AXIS and isinstance(value, Mapping):
            leaves = jax.tree.leaves(value)
            n = leaves[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        else:
            out[key] = unstack_layers(value)
    return out


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
