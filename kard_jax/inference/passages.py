"""Knowledge sources at evaluation: which passages go into the student's prompt.

A *ranker* maps examples to passage positions in the knowledge base's store, best first. Every
source of the paper's table is one ranker:

  none      no knowledge (FT and RD students)
  bm25      BM25 with the question query (KARD-BM25)
  dense     the KB's dense index with the question query, embedded by the KB's embedder
  reranked  BM25 (or dense) candidates rescored by the trained reranker (KARD-reranker;
            `kard_jax.inference.rerank`)
  silver    BM25 with the teacher's rationale for the evaluated question (the oracle row: the
            knowledge rationale-based retrieval would find; needs the teacher stage run on the
            evaluated examples file; questions whose rationales were all filtered out fall back
            to BM25 by the question, and metrics.json counts them)

The question query is `kard_jax.data.query.question_query` (the retrieval cache and the reranker
use the same function), and `passages_from` renders the top `n_docs` with
`prompts.format_passage`, as the seqio tasks do at training time.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kard_jax.data import prompts
from kard_jax.data.example import Example
from kard_jax.data.query import check_query_form, question_query
from kard_jax.errors import InputError

PASSAGE_SOURCES = ("none", "bm25", "dense", "reranked", "silver")
# passages_for(examples) -> one list of passage strings (already formatted) per example.
PassageFn = Callable[[Sequence[Example]], list[list[str]]]
# rank(examples) -> one list of store positions, best first, per example.
Ranker = Callable[[Sequence[Example]], list[list[int]]]


class KnowledgeBase:
    """A knowledge-base directory (`kard_jax.knowledge.run.build_kb`): store + BM25, loaded once."""

    def __init__(self, kb_dir: str | os.PathLike):
        from kard_jax.knowledge import run as knowledge_run

        self.directory = pathlib.Path(kb_dir)
        if not (self.directory / "passages").is_dir():
            raise InputError("not a knowledge base directory (no passages/); build it with runs/build_kb.gin",
                             path=self.directory, field="kb_dir")
        self.store, self.bm25 = knowledge_run.load_kb(self.directory)

    def passage_vectors(self) -> np.ndarray:
        """The dense passage embeddings [num_passages, dim] in store order (embeddings/, from
        `build_kb` with an EMBEDDER), loaded once."""
        if getattr(self, "_vectors", None) is None:
            from kard_jax.knowledge import run as knowledge_run

            self._vectors = knowledge_run.load_passage_vectors(self.directory, len(self.store))
        return self._vectors

    def texts(self, positions: Sequence[int]) -> list[str]:
        return [prompts.format_passage(p.title, p.text) for p in self.store.get_many(list(positions))]

    def ids(self, positions: Sequence[int]) -> list[str]:
        return list(self.store.ids_of(list(positions)))


def no_passages(examples: Sequence[Example]) -> list[list[str]]:
    """FT / RD students: no knowledge in the prompt."""
    return [[] for _ in examples]


def bm25_ranker(kb: KnowledgeBase, k: int, query_form: str) -> Ranker:
    """Top `k` by BM25 with the question query."""
    check_query_form(query_form)

    def rank(examples: Sequence[Example]) -> list[list[int]]:
        if not examples:
            return []
        indices, _ = kb.bm25.search([question_query(e, query_form) for e in examples], k=min(k, kb.bm25.num_docs))
        return [[int(i) for i in row] for row in indices]

    return rank


def dense_ranker(kb: KnowledgeBase, k: int, query_form: str, embedder: Any) -> Ranker:
    """Top `k` from the KB's dense index (ScaNN or brute force) with the embedded question query;
    `embedder` must be the one the KB's passages were embedded with (checked by dimension)."""
    from kard_jax.knowledge import embed as embed_lib, scann_index

    check_query_form(query_form)
    if embedder is None:
        raise InputError("passage_source='dense' needs an embedder (EMBEDDER: the one the KB was built with)",
                         field="embedder")
    if not (kb.directory / "dense_index").is_dir():
        raise InputError("the knowledge base has no dense index; build it with an EMBEDDER in build_kb.gin",
                         path=kb.directory, field="dense_index")
    dim = embed_lib.load_embeddings(kb.directory / "embeddings").shape[1]
    if dim != embedder.dim:
        raise InputError(f"passages were embedded with dimension {dim}, the embedder gives {embedder.dim}",
                         path=kb.directory / "embeddings", field="embedder")
    searcher = scann_index.load_dense_index(kb.directory / "dense_index")

    def rank(examples: Sequence[Example]) -> list[list[int]]:
        if not examples:
            return []
        vectors = np.asarray(embedder.embed([question_query(e, query_form) for e in examples]), np.float32)
        indices, _ = searcher.search(vectors, min(k, len(searcher)))
        return [[int(i) for i in row] for row in indices]

    return rank


def first_rationales(rationales: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """question id -> its first non-empty kept rationale (the silver query)."""
    out = {}
    for qid, texts in rationales.items():
        for text in texts:
            if text and text.strip():
                out[str(qid)] = " ".join(text.split())
                break
    return out


def silver_ranker(kb: KnowledgeBase, k: int, rationales: Mapping[str, Sequence[str]],
                  fallback: Ranker | None = None) -> Ranker:
    """Top `k` by BM25 with the question's first kept teacher rationale as the query (the
    passages rationale-based retrieval finds, as at training time). A question without a kept
    rationale (the teacher was wrong on every sample) is ranked by `fallback` (e.g. BM25 by the
    question), or gets no passages; `rank.missing(examples)` counts them."""
    queries = first_rationales(rationales)

    def rank(examples: Sequence[Example]) -> list[list[int]]:
        have = [e for e in examples if e.id in queries]
        lacking = [e for e in examples if e.id not in queries]
        out: dict[str, list[int]] = {e.id: [] for e in examples}
        if have:
            indices, _ = kb.bm25.search([queries[e.id] for e in have], k=min(k, kb.bm25.num_docs))
            for e, row in zip(have, indices):
                out[e.id] = [int(i) for i in row]
        if lacking and fallback is not None:
            out.update(zip((e.id for e in lacking), fallback(lacking)))
        return [out[e.id] for e in examples]

    rank.missing = lambda examples: sum(e.id not in queries for e in examples)  # type: ignore[attr-defined]
    return rank


def passages_from(kb: KnowledgeBase, ranker: Ranker, n_docs: int) -> PassageFn:
    """A PassageFn: the ranker's top `n_docs`, formatted as at training time."""
    if n_docs < 0:
        raise InputError(f"n_docs must be >= 0, got {n_docs}", field="n_docs")

    def passages_for(examples: Sequence[Example]) -> list[list[str]]:
        if n_docs == 0:
            return [[] for _ in examples]
        return [kb.texts(row[:n_docs]) for row in ranker(examples)]

    return passages_for
