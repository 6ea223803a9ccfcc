"""Flax (linen) BERT-family encoder: BERT, MiniLM, LinkBERT / BioLinkBERT and RoBERTa-style models.

The variants differ only in configuration (`BertConfig`, field names as Hugging Face's
`BertConfig` / `RobertaConfig`), so one network covers them and weights move both ways through
`kard_jax.hf_bert_io`:

* post-LayerNorm transformer layers (attention -> add -> LayerNorm -> MLP -> add -> LayerNorm),
  biases everywhere, LayerNorm statistics in float32 (`layer_norm_eps`),
* learned absolute position embeddings; BERT numbers positions 0..L-1, RoBERTa-style models
  (`position_ids_from_padding=True`) number real tokens from `pad_token_id + 1` and give padding
  the position `pad_token_id` (transformers' `create_position_ids_from_input_ids`),
* token-type (segment) embeddings; inputs are single segments (type 0) unless given,
* attention scaled by head_dim**-0.5; padded keys (token == `pad_token_id`) are masked.

Every parameter carries logical axis names (the T5 model's vocabulary: `vocab`, `embed`,
`heads`, `kv`, `mlp`, `abspos_buckets`) and key activations carry logical constraints, so the
rules table of `kard_jax.training.partitioning` shards it exactly like the T5 model.

Parameter tree (what `hf_bert_io` maps): `embeddings/{word,position,token_type}_embeddings/
embedding`, `embeddings/layer_norm/{scale,bias}`, `layers_{i}/attention/{query,key,value,out}/
{kernel,bias}`, `layers_{i}/attention_layer_norm`, `layers_{i}/mlp/{wi,wo}/{kernel,bias}`,
`layers_{i}/mlp_layer_norm`, and `pooler/{kernel,bias}` when `add_pooling_layer`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array

NEG_INF = -1e10  # additive mask; exp() underflows to exactly 0 in float32
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters; names follow Hugging Face's `BertConfig`."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int = 0
    position_ids_from_padding: bool = False  # RoBERTa-style position numbering
    add_pooling_layer: bool = False  # BertModel's tanh pooler over [CLS] (unused by the reranker)
    model_type: str = "bert"  # written back on export: "bert" or "roberta"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"  # "none" or "full"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.remat_policy not in ("none", "full"):
            raise ValueError(f"BertConfig.remat_policy must be 'none' or 'full', got {self.remat_policy!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BertConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig.hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raise early on a typo

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_model(self) -> int:  # the name the embedder / reranker use for the output width
        return self.hidden_size


# Shapes of common checkpoints (all-MiniLM-L6-v2, BERT / LinkBERT base and large) plus a tiny one for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64),
    "minilm_l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def preset_config(name: str, **overrides: Any) -> BertConfig:
    """A named BERT shape with any field overridden (gin: `bert.preset_config.name`)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown BERT preset {name!r}; known presets: {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(BertConfig)}
    if unknown:
        raise ValueError(f"Unknown BertConfig field(s) {sorted(unknown)} in overrides of preset {name!r}")
    return BertConfig(**{**PRESETS[name], **overrides})


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
    """Dense layer with named kernel / bias axes; contracts the input's last `contract_dims` dims."""

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    stddev: float
    dtype: Any
    param_dtype: Any
    contract_dims: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n = self.contract_dims
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.kernel_axes),
            tuple(x.shape[-n:]) + tuple(self.features), self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[n:]),
            tuple(self.features), self.param_dtype,
        )
        x = jnp.asarray(x, self.dtype)
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(x, jnp.asarray(kernel, self.dtype), (contract, ((), ())))
        return y + jnp.asarray(bias, self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias; statistics in float32 (torch.nn.LayerNorm numerics)."""

    epsilon: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (d,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (d,),
                          self.param_dtype)
        x32 = jnp.asarray(x, jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    axes: tuple[str, str]
    stddev: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.axes),
                           (self.num_embeddings, self.features), self.param_dtype)
        return jnp.take(jnp.asarray(table, self.dtype), ids, axis=0)


def _dropout(rate: float, x: Array, enable_dropout: bool) -> Array:
    if enable_dropout and rate > 0:
        return nn.Dropout(rate=rate)(x, deterministic=False)
    return x


def position_ids(tokens: Array, config: BertConfig) -> Array:
    """[b, l] absolute position ids (BERT: 0..l-1; RoBERTa: pad+1.. on real tokens, pad on padding)."""
    if not config.position_ids_from_padding:
        return jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
    real = (tokens != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + config.pad_token_id


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, tokens: Array, token_type_ids: Array | None, enable_dropout: bool) -> Array:
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        embed = lambda n, axes, name: Embed(n, c.hidden_size, axes, c.initializer_range, dt, pdt, name=name)  # noqa: E731
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)
        x = embed(c.vocab_size, ("vocab", "embed"), "word_embeddings")(tokens)
        x = x + embed(c.max_position_embeddings, ("abspos_buckets", "embed"), "position_embeddings")(
            position_ids(tokens, c))
        x = x + embed(c.type_vocab_size, ("abspos_buckets", "embed"), "token_type_embeddings")(token_type_ids)
        x = LayerNorm(c.layer_norm_eps, dt, pdt, name="layer_norm")(x)
        return _constrain(_dropout(c.hidden_dropout_prob, x, enable_dropout), ("batch", "length", "embed"))


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, enable_dropout: bool) -> Array:
        c = self.config
        h, dk = c.num_attention_heads, c.head_dim
        dense = lambda name, features, axes, n=1: Dense(  # noqa: E731
            features, axes, c.initializer_range, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), n, name=name)
        qkv_axes = ("embed", "heads", "kv")
        query = dense("query", (h, dk), qkv_axes)(x)
        key = dense("key", (h, dk), qkv_axes)(x)
        value = dense("value", (h, dk), qkv_axes)(x)
        query, key, value = (_constrain(t, ("batch", "length", "heads", "kv")) for t in (query, key, value))
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * (dk ** -0.5)
        weights = jax.nn.softmax(scores + bias, axis=-1)
        weights = _dropout(c.attention_probs_dropout_prob, weights, enable_dropout).astype(jnp.dtype(c.dtype))
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        out = dense("out", (c.hidden_size,), ("heads", "kv", "embed"), 2)(out)
        return _constrain(out, ("batch", "length", "embed"))


class Mlp(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        hidden = Dense((c.intermediate_size,), ("embed", "mlp"), c.initializer_range, dt, pdt, name="wi")(x)
        hidden = _constrain(ACTIVATIONS[c.hidden_act](hidden), ("batch", "length", "mlp"))
        out = Dense((c.hidden_size,), ("mlp", "embed"), c.initializer_range, dt, pdt, name="wo")(hidden)
        return _constrain(out, ("batch", "length", "embed"))


class Layer(nn.Module):
    """Post-LN transformer layer (BertLayer)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, enable_dropout: bool) -> Array:
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        y = SelfAttention(c, name="attention")(x, bias, enable_dropout)
        x = LayerNorm(c.layer_norm_eps, dt, pdt, name="attention_layer_norm")(
            x + _dropout(c.hidden_dropout_prob, y, enable_dropout))
        y = Mlp(c, name="mlp")(x)
        x = LayerNorm(c.layer_norm_eps, dt, pdt, name="mlp_layer_norm")(
            x + _dropout(c.hidden_dropout_prob, y, enable_dropout))
        return _constrain(x, ("batch", "length", "embed"))


def padding_bias(tokens: Array, pad_id: int) -> Array:
    """[b, 1, 1, k] additive mask hiding padded keys."""
    return jnp.where(tokens != pad_id, 0.0, NEG_INF)[:, None, None, :].astype(jnp.float32)


class BertEncoder(nn.Module):
    """tokens [b, l] (padded with `pad_token_id`) -> last hidden states [b, l, hidden_size].

    `pooled` gives BertModel's pooler output (tanh(dense(h[:, 0]))) when `add_pooling_layer`.
    """

    config: BertConfig

    def setup(self):
        c = self.config
        self.embeddings = Embeddings(c)
        layer_cls = nn.remat(Layer, static_argnums=(3,)) if c.remat_policy == "full" else Layer
        self.layers = [layer_cls(c, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        if c.add_pooling_layer:
            self.pooler = Dense((c.hidden_size,), ("embed", "mlp"), c.initializer_range, jnp.dtype(c.dtype),
                                jnp.dtype(c.param_dtype))

    def __call__(self, tokens: Array, enable_dropout: bool = False, token_type_ids: Array | None = None) -> Array:
        c = self.config
        x = self.embeddings(tokens, token_type_ids, enable_dropout)
        bias = padding_bias(tokens, c.pad_token_id)
        for layer in self.layers:
            x = layer(x, bias, enable_dropout)
        return x

    def pooled(self, hidden: Array) -> Array:
        if not self.config.add_pooling_layer:
            raise ValueError("this BertConfig has no pooling layer (add_pooling_layer=False)")
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def encode_and_pool(self, tokens: Array) -> tuple[Array, Array]:
        hidden = self(tokens)
        return hidden, self.pooled(hidden)


def init_params(config: BertConfig, rng: Array | None = None, length: int = 8) -> Any:
    """Freshly initialised, unboxed parameters of `BertEncoder(config)`."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    model = BertEncoder(config)
    variables = model.init(rng, jnp.ones((1, length), jnp.int32))
    if config.add_pooling_layer:  # setup() creates the pooler lazily: run it once
        variables = model.init(rng, jnp.ones((1, length), jnp.int32), method=BertEncoder.encode_and_pool)
    return nn.meta.unbox(variables["params"])


def mean_pool(hidden: Array, tokens: Array, pad_id: int, *, normalize: bool = True) -> Array:
    """[b, l, d] states -> [b, d]: mean over non-pad tokens (sentence-transformers), then L2 norm."""
    mask = (tokens != pad_id).astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=-2)
    mean = summed / jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)
    if not normalize:
        return mean
    # max(norm, 1e-12) as torch's F.normalize, written so the gradient at a zero vector (an empty
    # candidate slot) is 0 rather than NaN.
    return mean * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(mean), axis=-1, keepdims=True), 1e-24))


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
