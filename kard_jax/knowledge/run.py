"""Gin-free run modes: `build_kb` (corpus -> passage store + BM25 [+ embeddings + dense index])
and `retrieve` (examples + rationales + KB -> retrieval cache). Bound in gin_configs/runs/.

KB directory layout: manifest.json, passages/ (PassageStore), bm25/ (BM25Index), and with an
embedder: embeddings/ (.npy shards) and dense_index/ (ScaNN or brute force).

Under several processes (`jax.distributed`, `--multihost`) every process runs `build_kb` with
the same arguments: process 0 builds the passage store and BM25, each process embeds its block
of the passages on its own devices, process 0 builds the one dense index and moves the KB into
place; `kb_dir` must be on a filesystem every host shares (NFS/Filestore, a gcsfuse mount).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Sequence

import jax
import numpy as np

from kard_jax.knowledge import atomic, bm25 as bm25_lib, embed as embed_lib, retrieval_cache, scann_index
from kard_jax.errors import InputError
from kard_jax.knowledge.passage_store import PassageStore, build_passage_store

_FORMAT = "kard_jax.kb/1"


def build_kb(
    *,
    corpus_paths: Sequence[str] | str,
    kb_dir: str,
    chunk_words: int | None = None,
    chunk_stride: int | None = None,
    dedup: bool = True,
    skip_empty_text: bool = False,
    bm25_config: bm25_lib.BM25Config = bm25_lib.BM25Config(),
    embedder: "embed_lib.T5Embedder | None" = None,
    embedding_dtype: str = "float32",
    scann_config: scann_index.ScannConfig = scann_index.ScannConfig(),
    show_progress: bool = True,
) -> dict:
    """Builds a knowledge base directory atomically and returns its manifest."""
    if isinstance(corpus_paths, (str, os.PathLike)):
        corpus_paths = [corpus_paths]
    start = time.time()
    main = jax.process_index() == 0
    with embed_lib.shared_atomic_directory(kb_dir) as tmp:

        def text_indexes():  # process 0 only: the passage store and BM25
            if not main:
                return None, None
            store = build_passage_store(corpus_paths, tmp / "passages", chunk_words=chunk_words,
                                        chunk_stride=chunk_stride, dedup=dedup, skip_empty_text=skip_empty_text,
                                        show_progress=show_progress)
            index = bm25_lib.BM25Index.build((store.contents(i) for i in range(len(store))), bm25_config,
                                             show_progress=show_progress)
            index.save(tmp / "bm25")
            return store, index

        store, index = embed_lib.agree("building the passage store and BM25 index", text_indexes)
        dense_kind = None
        if embedder is not None:
            # The other processes read the passages process 0 just wrote (shared filesystem).
            store = embed_lib.agree("opening the passage store", lambda: store if store is not None
                                     else PassageStore(tmp / "passages"))
            embed_lib.embed_passages(store.contents, len(store), embedder, tmp / "embeddings", dtype=embedding_dtype,
                                     show_progress=show_progress)
            if main:  # one index over every process's shards
                searcher = scann_index.build_dense_index(embed_lib.load_embeddings(tmp / "embeddings"), scann_config)
                searcher.save(tmp / "dense_index")
                dense_kind = searcher.kind
        if main:
            manifest = {
                "format": _FORMAT,
                "corpus_paths": [os.path.abspath(p) for p in corpus_paths],
                "passages": store.manifest,
                "bm25": {"config": dataclasses.asdict(bm25_config), "vocab_size": len(index.retriever.vocab_dict)},
                "dense_index": dense_kind,
                "build_seconds": round(time.time() - start, 2),
            }
            atomic.write_json(tmp / "manifest.json", manifest)
    if not main:  # process 0 has moved the KB into place (shared_atomic_directory waited for it)
        return atomic.read_json(pathlib.Path(kb_dir) / "manifest.json")
    m = store.manifest
    print(f"kard_jax build_kb: {m['num_passages']} passages from {m['num_documents']} documents "
          f"({m['num_duplicates_dropped']} duplicates, {m['num_empty_skipped']} empty dropped), "
          f"BM25 vocab {manifest['bm25']['vocab_size']}, "
          f"dense index: {dense_kind or 'none'}, {manifest['build_seconds']} s -> {kb_dir}")
    return manifest


def load_kb(kb_dir: str | os.PathLike) -> tuple[PassageStore, bm25_lib.BM25Index]:
    kb_dir = pathlib.Path(kb_dir)
    return PassageStore(kb_dir / "passages"), bm25_lib.BM25Index.load(kb_dir / "bm25")


def retrieve(
    *,
    examples_path: str,
    kb_dir: str,
    output_dir: str,
    rationales_path: str | None = None,  # teacher output dir or rationales JSONL(.gz) file
    examples_format: str = "kard",
    dataset: str | None = None,
    config: retrieval_cache.RetrievalConfig = retrieval_cache.RetrievalConfig(),
    embedder: "embed_lib.T5Embedder | None" = None,
    show_progress: bool = True,
) -> dict:
    """Builds the retrieval cache of one split (train when `rationales_path` is given, else eval).

    With `config.question_retriever == "dense"`, `embedder` embeds the questions (it must be the
    one `build_kb` embedded the passages with) and the KB's dense index serves them.
    """
    from kard_jax.data.readers import read_examples
    from kard_jax.teacher.store import read_rationales

    start = time.time()
    examples = read_examples(examples_path, format=examples_format, dataset=dataset)
    rationales = read_rationales(rationales_path) if rationales_path else None
    store, index = load_kb(kb_dir)
    dense = _dense_retriever(pathlib.Path(kb_dir), embedder) if config.question_retriever == "dense" else None
    manifest = retrieval_cache.build_retrieval_cache(
        examples, output_dir, store=store, bm25=index, rationales=rationales, config=config, dense=dense,
        inputs={"examples": os.path.abspath(examples_path), "kb_dir": os.path.abspath(kb_dir),
                "rationales": os.path.abspath(rationales_path) if rationales_path else None},
        show_progress=show_progress,
    )
    c = manifest["counts"]
    print(f"kard_jax retrieve: {c['questions']} questions, {c['rationales']} rationales "
          f"({manifest['split_kind']}), top-{config.rationale_top_k} per rationale, "
          f"top-{config.question_top_k} per question, {time.time() - start:.1f} s -> {output_dir}")
    return manifest


def load_passage_vectors(kb_dir: str | os.PathLike, num_passages: int, *,
                         field: str = "stored_passages") -> np.ndarray:
    """The knowledge base's dense passage embeddings [num_passages, dim] in store order
    (embeddings/, written by `build_kb` with an EMBEDDER); refused when absent or of another count."""
    directory = pathlib.Path(kb_dir) / "embeddings"
    if not directory.is_dir():
        raise InputError("the knowledge base has no passage embeddings (embeddings/): build it with the reranker's "
                         "backbone as EMBEDDER (runs/build_kb.gin)", path=kb_dir, field=field)
    vectors = embed_lib.load_embeddings(directory)
    if len(vectors) != num_passages:
        raise InputError(f"{len(vectors)} passage embeddings for {num_passages} passages: the embeddings are stale, "
                         "rebuild the KB", path=directory, field=field)
    return vectors


def _dense_retriever(kb_dir: pathlib.Path, embedder: "embed_lib.T5Embedder | None") -> retrieval_cache.DenseRetriever:
    if embedder is None:
        raise InputError("question_retriever='dense' needs an embedder (EMBEDDER in retrieve.gin)", field="embedder")
    if not (kb_dir / "dense_index").is_dir():
        raise InputError("the knowledge base has no dense index; build it with an EMBEDDER in build_kb.gin",
                         path=kb_dir, field="dense_index")
    vectors = embed_lib.load_embeddings(kb_dir / "embeddings")
    if vectors.shape[1] != embedder.dim:
        raise InputError(f"passages were embedded with dimension {vectors.shape[1]}, the embedder gives "
                         f"{embedder.dim}: use the embedder the KB was built with", path=kb_dir / "embeddings",
                         field="embedder")
    embeddings_manifest = (kb_dir / "embeddings" / "manifest.json").read_text()
    return retrieval_cache.DenseRetriever(
        embed_queries=embedder.embed,
        searcher=scann_index.load_dense_index(kb_dir / "dense_index"),
        passage_vectors=vectors,
        fingerprint=json.dumps({"embeddings": json.loads(embeddings_manifest), "dim": embedder.dim}, sort_keys=True),
    )
