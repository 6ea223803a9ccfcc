"""Inference-time reranking (KARD Sec. 3.3): BM25 top-`n_candidates` passages by the question,
rescored by the late-interaction reranker; the top `n_docs` go into the student's prompt.

The query and passage texts are exactly the reranker's training texts
(`prompts.format_question`, `prompts.format_passage`, as in `kard_jax.tasks.sources`), tokenized
TensorFlow-free with the same SentencePiece ids and EOS handling as seqio.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from kard_jax.data import prompts
from kard_jax.data.example import Example
from kard_jax.errors import InputError
from kard_jax.inference.pipeline import PassageFn
from kard_jax.models import reranker as reranker_lib
from kard_jax.tokenizer import Tokenizer


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Candidate positions by descending score; ties keep the BM25 order (stable)."""
    return np.argsort(-np.asarray(scores), axis=-1, kind="stable")


def reranked_passages(
    kb_dir: str | os.PathLike,
    *,
    model: reranker_lib.LateInteractionReranker | reranker_lib.RerankerModel,
    params: Any,
    tokenizer: Tokenizer,
    n_candidates: int = 100,
    n_docs: int = 1,
    query_length: int = 128,
    candidate_length: int = 256,
    batch_size: int = 8,
) -> PassageFn:
    """A PassageFn: BM25 top-`n_candidates` by the question, reranked, top `n_docs` formatted.

    Every call scores `batch_size` questions at a time with fixed shapes ([batch_size,
    query_length], [batch_size, n_candidates', candidate_length], n_candidates' = min(n_candidates,
    KB size)), so the scorer compiles once.
    """
    from kard_jax.knowledge import run as knowledge_run

    if n_candidates < 1 or n_docs < 0 or n_docs > n_candidates or batch_size < 1:
        raise InputError(f"need n_candidates >= 1, 0 <= n_docs <= n_candidates, batch_size >= 1; got "
                         f"n_candidates={n_candidates}, n_docs={n_docs}, batch_size={batch_size}",
                         field="reranked_passages")
    store, bm25 = knowledge_run.load_kb(kb_dir)

    def score_chunk(queries: list[str], candidates: list[list[str]]) -> np.ndarray:
        pad = batch_size - len(queries)
        width = len(candidates[0])
        query_tokens = tokenizer.batch_encode(queries + [""] * pad, query_length)
        flat = [text for row in candidates for text in row] + [""] * (pad * width)
        cand_tokens = tokenizer.batch_encode(flat, candidate_length).reshape(batch_size, width, candidate_length)
        scores = reranker_lib.score_candidates(model, params, query_tokens, cand_tokens)
        return np.asarray(scores)[: len(queries)]

    def passages_for(examples: Sequence[Example]) -> list[list[str]]:
        if n_docs == 0 or not examples:
            return [[] for _ in examples]
        queries = [prompts.format_question(e) for e in examples]
        indices, _ = bm25.search(queries, k=n_candidates)
        out: list[list[str]] = []
        for start in range(0, len(examples), batch_size):
            rows = indices[start:start + batch_size]
            texts = [[prompts.format_passage(p.title, p.text) for p in store.get_many(row)] for row in rows]
            scores = score_chunk(queries[start:start + batch_size], texts)
            for row_texts, order in zip(texts, rerank_order(scores)):
                out.append([row_texts[i] for i in order[:n_docs]])
        return out

    return passages_for
