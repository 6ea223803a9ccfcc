"""Inference-time reranking (KARD Sec. 3.3): candidates retrieved with the question query (BM25
top-`n_candidates`, or dense), rescored by the trained reranker; the top `n_docs` go into the
student's prompt.

The query and passage texts are exactly the reranker's training texts
(`question_query`, `prompts.format_passage`, as in `kard_jax.tasks.sources`), tokenized
TensorFlow-free with the same SentencePiece ids and EOS handling as seqio.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from kard_jax.data.example import Example
from kard_jax.data.query import DEFAULT_QUERY_FORM, check_query_form, question_query
from kard_jax.errors import InputError
from kard_jax.inference.passages import KnowledgeBase, PassageFn, Ranker, bm25_ranker, passages_from
from kard_jax.models import reranker as reranker_lib
from kard_jax.tokenizer import Tokenizer


def reranker_tokenizer(path: str | os.PathLike) -> Any:
    """The reranker's tokenizer: a Hugging Face BERT-family directory (vocab.txt / tokenizer.json,
    e.g. MiniLM) or a SentencePiece vocabulary directory (the T5 backbone's, usually the student's)."""
    import pathlib

    directory = pathlib.Path(path)
    if any((directory / name).is_file() for name in ("vocab.txt", "tokenizer.json", "vocab.json")):
        from kard_jax import hf_bert_io

        return hf_bert_io.load_tokenizer(directory)
    return Tokenizer(directory)


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Candidate positions by descending score; ties keep the BM25 order (stable)."""
    return np.argsort(-np.asarray(scores), axis=-1, kind="stable")


def reranked_ranker(
    kb: KnowledgeBase,
    candidates: Ranker,
    *,
    model: reranker_lib.LateInteractionReranker | reranker_lib.RerankerModel,
    params: Any,
    tokenizer: Tokenizer,
    query_form: str = DEFAULT_QUERY_FORM,
    query_length: int = 128,
    candidate_length: int = 256,
    batch_size: int = 8,
) -> Ranker:
    """A Ranker: the `candidates` ranker's list for each question (BM25 or dense by the question
    query), reordered by the reranker's scores (ties keep the candidate order). A hybrid reranker
    (`lexical_weight`) also gets each candidate's BM25 score against the question query.

    A `stored_passages` reranker scores the knowledge base's own passage embeddings
    (`kb.passage_vectors()`), gathered per candidate instead of tokenized and encoded.

    Every call scores `batch_size` questions at a time with fixed shapes ([batch_size,
    query_length], [batch_size, n, candidate_length]), so the scorer compiles once per list length.
    """
    check_query_form(query_form)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")

    lexical = reranker_lib.uses_lexical_scores(model)
    stored = kb.passage_vectors() if reranker_lib.uses_stored_passages(model) else None

    def score_chunk(queries: list[str], rows: list[list[int]]) -> np.ndarray:
        pad = batch_size - len(queries)
        width = max(len(row) for row in rows)
        query_tokens = tokenizer.batch_encode(queries + [""] * pad, query_length)
        cand_tokens = cand_vectors = None
        if stored is not None:
            cand_vectors = np.zeros((batch_size, width, stored.shape[1]), np.float32)
            for i, row in enumerate(rows):
                cand_vectors[i, :len(row)] = stored[np.asarray(row, np.int64)]
        else:
            texts = [kb.texts(row) for row in rows]
            flat = [t for row in texts for t in row + [""] * (width - len(row))] + [""] * (pad * width)
            cand_tokens = tokenizer.batch_encode(flat, candidate_length).reshape(batch_size, width, candidate_length)
        lexical_scores = None
        if lexical:  # the hybrid reranker's feature: BM25 against the question query, z over the list
            lexical_scores = np.zeros((batch_size, width), np.float32)
            for i, (query, row) in enumerate(zip(queries, rows)):
                lexical_scores[i, :len(row)] = reranker_lib.lexical_features(kb.bm25.score_candidates(query, row))
        scores = np.array(reranker_lib.score_candidates(model, params, query_tokens, cand_tokens,
                                                        lexical_scores, cand_vectors))[: len(queries)]
        for i, row in enumerate(rows):  # padded slots last
            scores[i, len(row):] = -np.inf
        return scores

    def rank(examples: Sequence[Example]) -> list[list[int]]:
        lists = candidates(examples)
        out: list[list[int]] = []
        for start in range(0, len(examples), batch_size):
            rows = lists[start:start + batch_size]
            queries = [question_query(e, query_form) for e in examples[start:start + batch_size]]
            if not any(rows):
                out.extend([] for _ in rows)
                continue
            scores = score_chunk(queries, rows)
            for row, order in zip(rows, rerank_order(scores)):
                out.append([row[i] for i in order[: len(row)]])
        return out

    return rank


def reranked_passages(
    kb_dir: str | os.PathLike,
    *,
    model: reranker_lib.LateInteractionReranker | reranker_lib.RerankerModel,
    params: Any,
    tokenizer: Tokenizer,
    n_candidates: int = 100,
    n_docs: int = 1,
    query_form: str = DEFAULT_QUERY_FORM,
    query_length: int = 128,
    candidate_length: int = 256,
    batch_size: int = 8,
) -> PassageFn:
    """A PassageFn: BM25 top-`n_candidates` by the question query, reranked, top `n_docs` formatted."""
    if n_candidates < 1 or n_docs < 0 or n_docs > n_candidates or batch_size < 1:
        raise InputError(f"need n_candidates >= 1, 0 <= n_docs <= n_candidates, batch_size >= 1; got "
                         f"n_candidates={n_candidates}, n_docs={n_docs}, batch_size={batch_size}",
                         field="reranked_passages")
    kb = KnowledgeBase(kb_dir)
    ranker = reranked_ranker(kb, bm25_ranker(kb, n_candidates, query_form), model=model, params=params,
                             tokenizer=tokenizer, query_form=query_form, query_length=query_length,
                             candidate_length=candidate_length, batch_size=batch_size)
    return passages_from(kb, ranker, n_docs)
