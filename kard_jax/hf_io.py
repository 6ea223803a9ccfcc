"""Hugging Face T5 import/export: one mapping table plus per-key hooks, used in both directions.

`_MAPPING` pairs every parameter of `kard_jax.models.t5.T5` with its key in a transformers
`T5ForConditionalGeneration` state dict (MaxText `param_mapping.py` style; names as in
transformers' `convert_t5x_checkpoint_to_pytorch.py`). `{i}` stands for the layer index; the
transform names a hook that converts an array between the two layouts (and its shape):

* torch `nn.Linear.weight` is [out, in]; ours is [in, ..out] (`linear`),
* attention q/k/v: [heads*d_kv, d_model] <-> [d_model, heads, d_kv] (`qkv`),
* attention o: [d_model, heads*d_kv] <-> [heads, d_kv, d_model] (`attn_out`),
* relative_attention_bias [buckets, heads] <-> rel_embedding [heads, buckets] (`transpose`).

Tied (original T5) vs untied (T5 v1.1 / Flan-T5) follows transformers: an explicit
`scale_decoder_outputs` (written by transformers 5) wins, else `tie_word_embeddings` (default
true). A `scan_layers` model's stacked layers are unstacked on export and stacked on import, so
the HF files are the same in both layouts. Export writes `tie_word_embeddings: false` for
untied models so every transformers version reads it right, with weights through `safetensors.numpy` (no torch at run time).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from flax.core import meta
from safetensors.numpy import save_file

from kard_jax import hf_files
from kard_jax.errors import InputError
from kard_jax.knowledge import atomic
from kard_jax.models import t5

from kard_jax.hf_files import CONFIG_FILE, SAFETENSORS_FILE  # noqa: F401 (part of this module's API)

GENERATION_CONFIG_FILE = "generation_config.json"
_flatten, _unflatten, _json_bytes, _read_weights = (hf_files.flatten, hf_files.unflatten, hf_files.json_bytes,
                                                    hf_files.read_weights)
SPIECE_FILE = "spiece.model"
TOKENIZER_FILES = (
    "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
)

# (our parameter path, HF state-dict key, transform, when). `when`: None (always), "gated"
# (gated-gelu MLP), "relu" (single wi), "untied" (separate lm_head).
_MAPPING: tuple[tuple[str, str, str, str | None], ...] = (
    ("token_embedder/embedding", "shared.weight", "identity", None),
    # Encoder.
    ("encoder/relpos_bias/rel_embedding", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "transpose", None),
    ("encoder/layers_{i}/pre_attention_layer_norm/scale", "encoder.block.{i}.layer.0.layer_norm.weight", "identity", None),
    ("encoder/layers_{i}/attention/query/kernel", "encoder.block.{i}.layer.0.SelfAttention.q.weight", "qkv", None),
    ("encoder/layers_{i}/attention/key/kernel", "encoder.block.{i}.layer.0.SelfAttention.k.weight", "qkv", None),
    ("encoder/layers_{i}/attention/value/kernel", "encoder.block.{i}.layer.0.SelfAttention.v.weight", "qkv", None),
    ("encoder/layers_{i}/attention/out/kernel", "encoder.block.{i}.layer.0.SelfAttention.o.weight", "attn_out", None),
    ("encoder/layers_{i}/pre_mlp_layer_norm/scale", "encoder.block.{i}.layer.1.layer_norm.weight", "identity", None),
    ("encoder/layers_{i}/mlp/wi_0/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "linear", "gated"),
    ("encoder/layers_{i}/mlp/wi_1/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "linear", "gated"),
    ("encoder/layers_{i}/mlp/wi/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wi.weight", "linear", "relu"),
    ("encoder/layers_{i}/mlp/wo/kernel", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "linear", None),
    ("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight", "identity", None),
    # Decoder.
    ("decoder/relpos_bias/rel_embedding", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "transpose", None),
    ("decoder/layers_{i}/pre_self_attention_layer_norm/scale", "decoder.block.{i}.layer.0.layer_norm.weight",
     "identity", None),
    ("decoder/layers_{i}/self_attention/query/kernel", "decoder.block.{i}.layer.0.SelfAttention.q.weight", "qkv", None),
    ("decoder/layers_{i}/self_attention/key/kernel", "decoder.block.{i}.layer.0.SelfAttention.k.weight", "qkv", None),
    ("decoder/layers_{i}/self_attention/value/kernel", "decoder.block.{i}.layer.0.SelfAttention.v.weight", "qkv", None),
    ("decoder/layers_{i}/self_attention/out/kernel", "decoder.block.{i}.layer.0.SelfAttention.o.weight", "attn_out", None),
    ("decoder/layers_{i}/pre_cross_attention_layer_norm/scale", "decoder.block.{i}.layer.1.layer_norm.weight",
     "identity", None),
    ("decoder/layers_{i}/encoder_decoder_attention/query/kernel", "decoder.block.{i}.layer.1.EncDecAttention.q.weight",
     "qkv", None),
    ("decoder/layers_{i}/encoder_decoder_attention/key/kernel", "decoder.block.{i}.layer.1.EncDecAttention.k.weight",
     "qkv", None),
    ("decoder/layers_{i}/encoder_decoder_attention/value/kernel", "decoder.block.{i}.layer.1.EncDecAttention.v.weight",
     "qkv", None),
    ("decoder/layers_{i}/encoder_decoder_attention/out/kernel", "decoder.block.{i}.layer.1.EncDecAttention.o.weight",
     "attn_out", None),
    ("decoder/layers_{i}/pre_mlp_layer_norm/scale", "decoder.block.{i}.layer.2.layer_norm.weight", "identity", None),
    ("decoder/layers_{i}/mlp/wi_0/kernel", "decoder.block.{i}.layer.2.DenseReluDense.wi_0.weight", "linear", "gated"),
    ("decoder/layers_{i}/mlp/wi_1/kernel", "decoder.block.{i}.layer.2.DenseReluDense.wi_1.weight", "linear", "gated"),
    ("decoder/layers_{i}/mlp/wi/kernel", "decoder.block.{i}.layer.2.DenseReluDense.wi.weight", "linear", "relu"),
    ("decoder/layers_{i}/mlp/wo/kernel", "decoder.block.{i}.layer.2.DenseReluDense.wo.weight", "linear", None),
    ("decoder/decoder_norm/scale", "decoder.final_layer_norm.weight", "identity", None),
    ("decoder/logits_dense/kernel", "lm_head.weight", "linear", "untied"),
)

# HF keys that duplicate `shared.weight` in some checkpoints (torch .bin files store tied
# tensors under every name); accepted on import only when equal to it.
_SHARED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Present in some old checkpoints and unused by transformers itself (it ignores it on load).
_IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


_HOOKS: dict[str, hf_files.Hook] = {**hf_files.HOOKS, "transpose": hf_files.HOOKS["linear"]}


def _mapping_rows(cfg: t5.T5Config) -> Iterator[tuple[str, str, str]]:
    """The mapping table expanded for `cfg`: (our path, HF key, transform) per parameter."""
    active = {None, "gated" if cfg.is_gated else "relu"}
    if not cfg.tie_word_embeddings:
        active.add("untied")
    for ours, hf, transform, when in _MAPPING:
        if when not in active:
            continue
        if "{i}" not in ours:
            yield ours, hf, transform
            continue
        layers = cfg.num_encoder_layers if ours.startswith("encoder/") else cfg.num_decoder_layers
        for i in range(layers):
            yield ours.format(i=i), hf.format(i=i), transform


def abstract_params(cfg: t5.T5Config, device: jax.Device | None = None) -> dict[str, Any]:
    """The model's unboxed parameter tree as ShapeDtypeStructs (nothing allocated), placed on
    `device` (default: the host CPU) — what `checkpoints.restore_params` restores into for export."""
    model = t5.T5(cfg)
    tokens = jax.ShapeDtypeStruct((1, 1), np.int32)
    abstract = meta.unbox(jax.eval_shape(lambda e, d: model.init(jax.random.PRNGKey(0), e, d), tokens, tokens))
    if device is None:
        try:
            device = jax.devices("cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
            device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract["params"])


def _unscanned(cfg: t5.T5Config) -> t5.T5Config:
    """The per-layer (`layers_i`) layout the mapping table and HF files use."""
    return dataclasses.replace(cfg, scan_layers=False) if cfg.scan_layers else cfg


def expected_param_shapes(cfg: t5.T5Config) -> dict[str, tuple[int, ...]]:
    """Our parameter paths ('a/b/c') and shapes, from the model itself (abstract init)."""
    return {path: tuple(x.shape) for path, x in _flatten(abstract_params(cfg)).items()}


# ---------------------------------------------------------------------------------------------
# Config.

_REQUIRED_HF_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")


def config_from_hf(config_json: Mapping[str, Any], *, path: Any = CONFIG_FILE, **overrides: Any) -> t5.T5Config:
    """A `t5.T5Config` from a transformers T5 `config.json` dict. `overrides` set other T5Config
    fields (e.g. dtype="bfloat16", dropout_rate=0.0); shape fields overridden here then fail the
    weight shape checks of `load_hf_params`."""
    if not isinstance(config_json, Mapping):
        raise InputError(f"expected a JSON object, got {type(config_json).__name__}", path=path)
    model_type = config_json.get("model_type", "t5")
    if model_type != "t5":
        raise InputError(f"unsupported model_type {model_type!r} (only 't5')", path=path, field="model_type")
    if config_json.get("is_encoder_decoder", True) is not True:
        raise InputError("only encoder-decoder T5 is supported", path=path, field="is_encoder_decoder")
    for name in _REQUIRED_HF_FIELDS:
        if name not in config_json:
            raise InputError("missing required field", path=path, field=name)

    integer, number = hf_files.config_readers(config_json, path)

    feed_forward_proj = config_json.get("feed_forward_proj", "relu")
    if feed_forward_proj not in ("gated-gelu", "relu"):
        raise InputError(
            f"unsupported feed_forward_proj {feed_forward_proj!r} (expected 'gated-gelu' or 'relu')",
            path=path, field="feed_forward_proj",
        )
    if "scale_decoder_outputs" in config_json:  # transformers 5 writes this and always tie_word_embeddings=true
        tied = config_json["scale_decoder_outputs"]
        tie_field = "scale_decoder_outputs"
    else:
        tied = config_json.get("tie_word_embeddings", True)
        tie_field = "tie_word_embeddings"
    if not isinstance(tied, bool):
        raise InputError(f"expected true or false, got {tied!r}", path=path, field=tie_field)
    pad_token_id = integer("pad_token_id", 0)
    fields = dict(
        vocab_size=integer("vocab_size"),
        d_model=integer("d_model"),
        d_kv=integer("d_kv"),
        d_ff=integer("d_ff"),
        num_heads=integer("num_heads"),
        num_encoder_layers=integer("num_layers"),
        num_decoder_layers=integer("num_decoder_layers", config_json["num_layers"]),
        relative_attention_num_buckets=integer("relative_attention_num_buckets", 32),
        relative_attention_max_distance=integer("relative_attention_max_distance", 128),
        dropout_rate=number("dropout_rate", 0.1),
        layer_norm_epsilon=number("layer_norm_epsilon", 1e-6),
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tied,
        pad_token_id=pad_token_id,
        eos_token_id=integer("eos_token_id", 1),
        decoder_start_token_id=integer("decoder_start_token_id", pad_token_id),
    )
    return hf_files.make_config(t5.T5Config, fields, overrides, path)


def config_to_hf(cfg: t5.T5Config) -> dict[str, Any]:
    """The transformers `config.json` dict for `cfg` (weights exported in float32)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": cfg.feed_forward_proj,
        "is_gated_act": cfg.is_gated,
        "dense_act_fn": "gelu_new" if cfg.is_gated else "relu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "dtype": "float32",
    }


def _generation_config(cfg: t5.T5Config) -> dict[str, Any]:
    return {
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


# ---------------------------------------------------------------------------------------------
# Reading weights.

def read_hf_config(hf_dir: str | os.PathLike, **overrides: Any) -> t5.T5Config:
    """The `t5.T5Config` of a transformers T5 directory (its config.json)."""
    hf_dir = pathlib.Path(hf_dir)
    if not hf_dir.is_dir():
        raise InputError("Hugging Face model directory does not exist", path=hf_dir)
    config_path = hf_dir / CONFIG_FILE
    if not config_path.is_file():
        raise InputError("missing config.json", path=config_path)
    try:
        config_json = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg}, column {e.colno})", path=config_path, line=e.lineno) from e
    return config_from_hf(config_json, path=config_path, **overrides)


def load_hf_params(hf_dir: str | os.PathLike, **overrides: Any) -> tuple[t5.T5Config, dict[str, Any]]:
    """(config, params) from a transformers T5ForConditionalGeneration directory.

    params is a plain nested dict of float32 numpy arrays with exactly the model's unboxed
    parameter tree. `overrides` set non-shape T5Config fields (dtype, dropout_rate, ...).
    """
    hf_dir = pathlib.Path(hf_dir)
    cfg = read_hf_config(hf_dir, **overrides)
    weights, sources = _read_weights(hf_dir)
    expected = expected_param_shapes(_unscanned(cfg))
    ours: dict[str, np.ndarray] = {}
    used = set(_IGNORED_KEYS)
    for path, hf_key, transform in _mapping_rows(cfg):
        hook = _HOOKS[transform]
        if hf_key not in weights:
            where = sorted({str(s) for s in sources.values()}) or [str(hf_dir)]
            raise InputError(
                f"missing weight (model config {CONFIG_FILE} needs it)", path=", ".join(where), field=hf_key
            )
        array = weights[hf_key]
        want = hook.hf_shape(expected[path])
        if array.shape != want:
            raise InputError(
                f"shape mismatch: {CONFIG_FILE} implies {want}, the checkpoint has {array.shape}",
                path=sources[hf_key], field=hf_key,
            )
        ours[path] = np.ascontiguousarray(hook.to_ours(array, expected[path]), dtype=np.float32)
        used.add(hf_key)
    shared = weights["shared.weight"]
    aliases = _SHARED_ALIASES + (("lm_head.weight",) if cfg.tie_word_embeddings else ())
    for key in aliases:
        if key in weights:
            if not np.array_equal(weights[key], shared):
                reason = ("the config says tied embeddings (tie_word_embeddings / scale_decoder_outputs) but this "
                          "differs from shared.weight") if key == "lm_head.weight" else "differs from shared.weight"
                raise InputError(reason, path=sources[key], field=key)
            used.add(key)
    unknown = sorted(set(weights) - used)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise InputError(f"unexpected weight(s) for this config: {shown}", path=sources[unknown[0]], field=unknown[0])
    if set(ours) != set(expected):  # the mapping table must cover the model exactly
        raise AssertionError(f"hf_io mapping out of sync with t5.T5: {sorted(set(ours) ^ set(expected))}")
    params = _unflatten(ours)
    return cfg, (t5.stack_layers(params) if cfg.scan_layers else params)


# ---------------------------------------------------------------------------------------------
# Export.


_ARCHITECTURE_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers",
    "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj", "tie_word_embeddings",
)


def initial_params(hf_dir: str | os.PathLike, model_config: t5.T5Config) -> dict[str, Any]:
    """Params of a local HF T5 directory, for `trainer.train(initial_checkpoint=...)`.

    Checks that the checkpoint's architecture equals `model_config` (the run's model gin), so a
    mismatch fails before training with the field named, instead of inside a shape error. Gin:
    `INITIAL_CHECKPOINT = @hf_io.initial_params` with `hf_io.initial_params.hf_dir = '...'` and
    `hf_io.initial_params.model_config = %MODEL_CONFIG`.
    """
    cfg, params = load_hf_params(hf_dir, scan_layers=model_config.scan_layers)
    for field in _ARCHITECTURE_FIELDS:
        ours, theirs = getattr(model_config, field), getattr(cfg, field)
        if ours != theirs:
            raise InputError(
                f"the checkpoint has {field}={theirs!r} but the run's model config has {ours!r}",
                path=pathlib.Path(hf_dir) / CONFIG_FILE, field=field,
            )
    return params

def params_to_hf(params: Mapping[str, Any], cfg: t5.T5Config) -> dict[str, np.ndarray]:
    """Our (possibly boxed, possibly sharded) params -> HF state dict of float32 numpy arrays."""
    params = meta.unbox(params)
    if cfg.scan_layers:  # HF files hold one tensor per layer whatever our layout
        params = t5.unstack_layers(jax.device_get(params))
    flat = {k: np.asarray(jax.device_get(v)) for k, v in _flatten(params).items()}
    expected = expected_param_shapes(_unscanned(cfg))
    for path in sorted(set(expected) | set(flat)):
        if path not in flat:
            raise InputError("missing parameter", path="params", field=path)
        if path not in expected:
            raise InputError("unexpected parameter for this config", path="params", field=path)
        if flat[path].shape != expected[path]:
            raise InputError(
                f"shape mismatch: config implies {expected[path]}, params have {flat[path].shape}",
                path="params", field=path,
            )
    return {
        hf_key: np.ascontiguousarray(_HOOKS[transform].to_hf(flat[path]), dtype=np.float32)
        for path, hf_key, transform in _mapping_rows(cfg)
    }


def _tokenizer_files(cfg: t5.T5Config, spiece_model: pathlib.Path | None, tokenizer_dir: pathlib.Path | None,
                     extra_ids: int) -> dict[str, bytes | pathlib.Path]:
    """Output file name -> source path or contents; validates everything before any write."""
    if spiece_model is not None and tokenizer_dir is not None:
        raise InputError("give spiece_model or tokenizer_dir, not both", path=spiece_model)
    if tokenizer_dir is not None:
        if not tokenizer_dir.is_dir():
            raise InputError("tokenizer directory does not exist", path=tokenizer_dir)
        files = {name: tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()}
        if SPIECE_FILE not in files and "tokenizer.json" not in files:
            raise InputError("no spiece.model or tokenizer.json in the tokenizer directory", path=tokenizer_dir)
        return files
    if spiece_model is None:
        return {}
    import sentencepiece  # local: only exports with a tokenizer need it

    if not spiece_model.is_file():
        raise InputError("SentencePiece model does not exist", path=spiece_model)
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(spiece_model))
    except (OSError, RuntimeError) as e:
        raise InputError(f"not a SentencePiece model ({e})", path=spiece_model) from e
    special_ids = (("pad_id", processor.pad_id(), cfg.pad_token_id), ("eos_id", processor.eos_id(), cfg.eos_token_id))
    for field, got, want in special_ids:
        if got != want:
            raise InputError(
                f"SentencePiece {field} is {got}, the model config expects {want}", path=spiece_model, field=field
            )
    if processor.get_piece_size() + extra_ids > cfg.vocab_size:
        raise InputError(
            f"{processor.get_piece_size()} pieces + {extra_ids} extra ids exceed vocab_size {cfg.vocab_size}",
            path=spiece_model, field="vocab_size",
        )
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tokenizer_config = {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids, "model_max_length": 512, **special}
    return {
        SPIECE_FILE: spiece_model,
        "tokenizer_config.json": _json_bytes(tokenizer_config),
        "special_tokens_map.json": _json_bytes(special),
    }


def export_hf(
    params: Mapping[str, Any],
    cfg: t5.T5Config,
    out_dir: str | os.PathLike,
    *,
    spiece_model: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    extra_ids: int = 100,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a transformers T5ForConditionalGeneration directory (config.json,
    generation_config.json, model.safetensors and, if given, the tokenizer) atomically.

    `spiece_model`: a SentencePiece model to package as a T5Tokenizer with `extra_ids` sentinels;
    `tokenizer_dir`: copy an existing HF tokenizer's files instead. An existing `out_dir` is
    replaced only with `overwrite=True`; on any error it is left as it was and nothing is written.
    """
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError("output directory exists (pass overwrite=True to replace it)", path=out_dir)
    state_dict = params_to_hf(params, cfg)
    tokenizer = _tokenizer_files(
        cfg,
        pathlib.Path(spiece_model) if spiece_model is not None else None,
        pathlib.Path(tokenizer_dir) if tokenizer_dir is not None else None,
        extra_ids,
    )
    # Temp dir + rename; files 0644 and the directory 0755 under umask 022 (not mkdtemp's 0700).
    with atomic.atomic_directory(out_dir, overwrite=True) as tmp:
        (tmp / CONFIG_FILE).write_bytes(_json_bytes(config_to_hf(cfg)))
        (tmp / GENERATION_CONFIG_FILE).write_bytes(_json_bytes(_generation_config(cfg)))
        save_file(state_dict, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
        for name, source in tokenizer.items():
            if isinstance(source, bytes):
                (tmp / name).write_bytes(source)
            else:
                shutil.copyfile(source, tmp / name)
    return out_dir
