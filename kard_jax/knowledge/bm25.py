"""BM25 over a passage store, built with bm25s and searched with batched sparse products.

Scoring (defaults = Lucene/pyserini, k1=0.9, b=0.4, method="lucene"):
    score(q, d) = sum over query tokens t (with repetition) of
                  idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
    idf(t)      = log(1 + (N - df + 0.5) / (df + 0.5))            ("lucene")
bm25s stores the same score without the constant (k1 + 1) factor (as Lucene >= 8 does); it
is applied at search time so scores match the classic formula above. Ranking is unaffected.

Tokenization (`BM25Config`): lower-case, regex `(?u)\\b\\w\\w+\\b` (scikit-learn / bm25s),
English stopwords from bm25s removed, no stemming. Queries and passages use the same function.
Ties are broken by the lower passage index, so results are deterministic.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Iterable, Sequence

import bm25s
import numpy as np
import scipy.sparse as sp
from bm25s.stopwords import STOPWORDS_EN
from tqdm.auto import tqdm

from kard_jax.knowledge import atomic

_FORMAT = "kard_jax.bm25/1"
_METHODS_WITHOUT_K1_PLUS_1 = ("lucene", "robertson")  # bm25s tf component lacks (k1 + 1)


@dataclasses.dataclass(frozen=True)
class BM25Config:
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"  # "lucene" | "robertson" | "atire" (bm25s names)
    lowercase: bool = True
    token_pattern: str = r"(?u)\b\w\w+\b"
    stopwords: str | None = "english"  # "english" or None


def tokenize(texts: Iterable[str], config: BM25Config = BM25Config()) -> list[list[str]]:
    """The one tokenizer for passages and queries (see module docstring)."""
    split = re.compile(config.token_pattern).findall
    if config.stopwords == "english":
        stop = frozenset(STOPWORDS_EN)
    elif config.stopwords is None:
        stop = frozenset()
    else:
        raise ValueError(f"stopwords must be 'english' or None, got {config.stopwords!r}")
    out = []
    for text in texts:
        if config.lowercase:
            text = text.lower()
        out.append([t for t in split(text) if t not in stop])
    return out


class BM25Index:
    """A bm25s score matrix ([docs, vocab] CSC) plus the tokenizer config that built it."""

    def __init__(self, retriever: bm25s.BM25, config: BM25Config):
        self.retriever = retriever
        self.config = config
        scores = retriever.scores
        self.num_docs = int(scores["num_docs"])
        self._vocab = retriever.vocab_dict
        self._scale = np.float32(config.k1 + 1.0) if config.method in _METHODS_WITHOUT_K1_PLUS_1 else np.float32(1.0)
        # Transposed view: term-major CSR [vocab, docs] shares bm25s' CSC arrays (no copy; plain
        # ndarray views of the memmaps avoid per-slice memmap overhead).
        data, indices, indptr = (np.asarray(scores[k]) for k in ("data", "indices", "indptr"))
        self._term_doc = sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, self.num_docs))

    @classmethod
    def build(cls, texts: Iterable[str], config: BM25Config = BM25Config(), *, show_progress: bool = True) -> "BM25Index":
        tokens = tokenize(tqdm(texts, desc="BM25 tokenize", disable=not show_progress, mininterval=2.0), config)
        if not tokens:
            raise ValueError("cannot build a BM25 index over zero passages")
        retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method, backend="numpy")
        retriever.index(tokens, show_progress=show_progress)
        return cls(retriever, config)

    def save(self, directory: str | os.PathLike) -> None:
        """Atomically writes the bm25s arrays + vocab and our config/manifest."""
        with atomic.atomic_directory(directory) as tmp:
            self.retriever.save(str(tmp), show_progress=False)
            atomic.write_json(tmp / "manifest.json", {
                "format": _FORMAT, "config": dataclasses.asdict(self.config), "num_docs": self.num_docs,
                "vocab_size": len(self._vocab), "bm25s_version": bm25s.__version__,
            })

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True) -> "BM25Index":
        directory = pathlib.Path(directory)
        manifest = atomic.read_json(directory / "manifest.json")
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"{directory}: not a kard_jax BM25 index")
        retriever = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False)
        return cls(retriever, BM25Config(**manifest["config"]))

    def _query_matrix(self, queries: Sequence[str]) -> sp.csr_matrix:
        """[n, vocab] term counts of each query (unknown terms dropped)."""
        rows, cols = [], []
        for r, toks in enumerate(tokenize(queries, self.config)):
            ids = [self._vocab[t] for t in toks if t in self._vocab]
            rows.extend([r] * len(ids))
            cols.extend(ids)
        data = np.ones(len(rows), dtype=np.float32)
        return sp.csr_matrix((data, (rows, cols)), shape=(len(queries), self._term_doc.shape[0]))

    def search(
        self, queries: Sequence[str], k: int, *, batch_size: int = 256, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages per query: (indices int64 [n, k'], scores float32 [n, k']), k' = min(k, N).

        Rows are sorted by descending score, ties by ascending index; passages sharing no term
        with the query score 0 and fill the tail in index order.
        """
        k = min(int(k), self.num_docs)
        n = len(queries)
        out_idx = np.zeros((n, k), dtype=np.int64)
        out_scores = np.zeros((n, k), dtype=np.float32)
        for start in tqdm(range(0, n, batch_size), desc="BM25 search", disable=not show_progress, mininterval=2.0):
            batch = queries[start:start + batch_size]
            scores = (self._query_matrix(batch) @ self._term_doc).tocsr()
            for r in range(len(batch)):
                lo, hi = scores.indptr[r], scores.indptr[r + 1]
                idx, sc = _top_k_sparse(scores.indices[lo:hi], scores.data[lo:hi], k)
                if len(idx) < k:
                    idx = np.concatenate([idx, _first_missing(idx, k - len(idx))])
                    sc = np.concatenate([sc, np.zeros(k - len(sc), np.float32)])
                out_idx[start + r] = idx
                out_scores[start + r] = sc * self._scale
        return out_idx, out_scores

    def score_candidates(self, query: str, candidate_indices: Sequence[int]) -> np.ndarray:
        """BM25 score of each given passage for `query` (float32 [len(candidates)])."""
        return self.score_candidates_batch([query], candidate_indices)[0]

    def score_candidates_batch(self, queries: Sequence[str], candidate_indices: Sequence[int]) -> np.ndarray:
        """BM25 scores [len(queries), len(candidates)] of the given passages, equal to what `search`
        reports for them, touching only the postings of the queries' terms (not the corpus)."""
        cands = np.asarray(candidate_indices, dtype=np.int64)
        q = self._query_matrix(queries)
        terms = np.unique(q.indices)
        if not len(terms) or not len(cands):
            return np.zeros((len(queries), len(cands)), dtype=np.float32)
        sub = self._term_doc[terms][:, cands]  # [terms, candidates]
        return (q[:, terms] @ sub).toarray().astype(np.float32) * self._scale


def _top_k_sparse(indices: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a sparse score row, by (-score, index)."""
    if len(scores) > 4 * k:
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        mask = scores >= threshold
        indices, scores = indices[mask], scores[mask]
    order = np.lexsort((indices, -scores))[:k]
    return indices[order].astype(np.int64), scores[order].astype(np.float32)


def _first_missing(taken: np.ndarray, count: int) -> np.ndarray:
    """The `count` smallest non-negative ints not in `taken`."""
    candidates = np.arange(len(taken) + count, dtype=np.int64)
    return np.setdiff1d(candidates, taken, assume_unique=False)[:count]
