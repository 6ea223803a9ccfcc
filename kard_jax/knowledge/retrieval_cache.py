"""The retrieval cache stage: BM25 (or dense) passages per rationale and per question.

Output directory (atomic; manifest.json holds inputs, config hash, counts, versions):
  rationale_retrieval-XXXXX-of-YYYYY.jsonl  (train only) one line per kept rationale:
      {"question_id", "rationale_index", "rationale", "passage_ids": [top-k by BM25 with the
       rationale as query], "scores": [...]}
  question_candidates-XXXXX-of-YYYYY.jsonl  one line per question:
      {"question_id", "candidate_ids": [top-N by question (BM25 or dense); train: optionally
       followed by the rationales' top-k not already there], "question_scores": [...],
       "labels": {rationale_index (str): [BM25 score of each candidate against it]}}
An eval split (no rationales) gets question candidates with empty labels. Re-running with the
same inputs and config is a no-op.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import platform
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from kard_jax.data.example import Example
from kard_jax.data.query import check_query_form, question_query
from kard_jax.errors import InputError
from kard_jax.knowledge import atomic
from kard_jax.knowledge.bm25 import BM25Index
from kard_jax.knowledge.passage_store import PassageStore

_FORMAT = "kard_jax.retrieval_cache/1"
RATIONALE_PREFIX = "rationale_retrieval"
QUESTION_PREFIX = "question_candidates"


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    rationale_top_k: int = 5  # passages per rationale (the student's knowledge; reranker 'r' set)
    question_top_k: int = 100  # candidates per question (reranker 'q' set; eval rerank pool)
    union_rationale_candidates: bool = True  # train candidates = question top-N U rationale top-k
    question_retriever: str = "bm25"  # "bm25" | "dense"
    query_form: str = "question"  # kard_jax.data.query.QUERY_FORMS: the ONE question query of every stage
    rows_per_shard: int = 50_000
    batch_size: int = 128  # questions per retrieval batch


@dataclasses.dataclass(frozen=True)
class DenseRetriever:
    """Question-side dense retrieval: an embed function, a searcher over passage vectors, the vectors."""

    embed_queries: Callable[[Sequence[str]], np.ndarray]
    searcher: Any  # scann_index.BruteForceSearcher | ScannSearcher
    passage_vectors: np.ndarray  # [N, d], to score union candidates
    fingerprint: str = ""  # identifies model + index for the config hash


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _versions() -> dict[str, str]:
    import bm25s

    return {"python": platform.python_version(), "numpy": np.__version__, "bm25s": bm25s.__version__}


def _query_text(example: Example, config: RetrievalConfig) -> str:
    return question_query(example, config.query_form)


class _ShardedJsonlWriter:
    """Writes `num_rows` JSON lines into PREFIX-XXXXX-of-YYYYY.jsonl files of rows_per_shard."""

    def __init__(self, directory: pathlib.Path, prefix: str, num_rows: int, rows_per_shard: int):
        self.directory, self.prefix, self.rows_per_shard = directory, prefix, rows_per_shard
        self.num_shards = max(1, math.ceil(num_rows / rows_per_shard))
        self.names: list[str] = []
        self.rows, self.file = 0, None
        self._open_next()

    def _open_next(self) -> None:
        if self.file:
            self.file.close()
        self.names.append(f"{self.prefix}-{len(self.names):05d}-of-{self.num_shards:05d}.jsonl")
        self.file = open(self.directory / self.names[-1], "w", encoding="utf-8")

    def write(self, row: dict) -> None:
        if self.rows and self.rows % self.rows_per_shard == 0:
            self._open_next()
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows += 1

    def close(self) -> None:
        self.file.close()


def _kept_rationales(examples: Sequence[Example], rationales: Mapping[str, Sequence[str]]):
    """(question_id -> [(rationale_index, text)]) for non-empty rationales of known questions."""
    return {
        ex.id: [(i, r.strip()) for i, r in enumerate(rationales.get(ex.id, ())) if r.strip()]
        for ex in examples
    }


def build_retrieval_cache(
    examples: Sequence[Example],
    output_dir: str | os.PathLike,
    *,
    store: PassageStore,
    bm25: BM25Index,
    rationales: Mapping[str, Sequence[str]] | None = None,
    dense: DenseRetriever | None = None,
    config: RetrievalConfig = RetrievalConfig(),
    inputs: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> dict:
    """Writes the retrieval cache for `examples` to `output_dir`; returns its manifest.

    `rationales` None means an eval split. `inputs` (e.g. file paths) is recorded in the manifest.
    """
    if not examples:
        raise InputError("no examples to retrieve for")
    if bm25.num_docs != len(store):
        raise InputError(f"BM25 index has {bm25.num_docs} passages but the store has {len(store)}", path=store.directory)
    if config.question_retriever not in ("bm25", "dense"):
        raise ValueError(f"question_retriever must be 'bm25' or 'dense', got {config.question_retriever!r}")
    check_query_form(config.query_form)
    if config.question_retriever == "dense" and dense is None:
        raise ValueError("question_retriever='dense' needs a DenseRetriever")
    seen = set()
    for ex in examples:
        if ex.id in seen:
            raise InputError(f"duplicate question id {ex.id!r} in examples", field="id")
        seen.add(ex.id)
    kept = _kept_rationales(examples, rationales) if rationales is not None else None
    fingerprint = {
        "config": dataclasses.asdict(config),
        "examples": _sha256([[e.id, e.question, list(e.options)] for e in examples]),
        "rationales": None if rationales is None else _sha256({k: list(v) for k, v in rationales.items()}),
        "store": {k: store.manifest[k] for k in ("sources", "num_passages", "chunk_words", "chunk_stride", "dedup")},
        "bm25": dataclasses.asdict(bm25.config),
        "dense": dense.fingerprint if (dense is not None and config.question_retriever == "dense") else None,
    }
    config_hash = _sha256(fingerprint)
    output_dir = pathlib.Path(output_dir)
    manifest_path = output_dir / "manifest.json"
    if manifest_path.is_file():
        old = atomic.read_json(manifest_path)
        if old.get("config_hash") == config_hash and all((output_dir / n).is_file() for n in old.get("files", [])):
            print(f"kard_jax: retrieval cache up to date: {output_dir}")
            return old

    num_rationales = sum(len(v) for v in kept.values()) if kept is not None else 0
    with atomic.atomic_directory(output_dir) as tmp:
        q_writer = _ShardedJsonlWriter(tmp, QUESTION_PREFIX, len(examples), config.rows_per_shard)
        r_writer = _ShardedJsonlWriter(tmp, RATIONALE_PREFIX, num_rationales, config.rows_per_shard) if kept else None
        bar = tqdm(total=len(examples), desc="retrieve", unit=" q", disable=not show_progress, mininterval=2.0)
        for start in range(0, len(examples), config.batch_size):
            batch = examples[start:start + config.batch_size]
            for row_q, rows_r in _retrieve_batch(batch, kept, store, bm25, dense, config):
                q_writer.write(row_q)
                for row in rows_r:
                    r_writer.write(row)
            bar.update(len(batch))
        bar.close()
        q_writer.close()
        files = list(q_writer.names)
        if r_writer:
            r_writer.close()
            files += r_writer.names
        manifest = {
            "format": _FORMAT,
            "split_kind": "eval" if kept is None else "train",
            "config_hash": config_hash,
            "config": dataclasses.asdict(config),
            "inputs": dict(inputs or {}),
            "fingerprint": fingerprint,
            "counts": {
                "questions": len(examples),
                "rationales": num_rationales,
                "questions_without_rationales": 0 if kept is None else sum(1 for v in kept.values() if not v),
                "passages": len(store),
            },
            "files": files,
            "versions": _versions(),
            "command": " ".join(sys.argv),
        }
        atomic.write_json(tmp / "manifest.json", manifest)
    return manifest


def _retrieve_batch(batch, kept, store, bm25, dense, config) -> Iterator[tuple[dict, list[dict]]]:
    queries = [_query_text(ex, config) for ex in batch]
    if config.question_retriever == "dense":
        q_vecs = dense.embed_queries(queries)
        q_idx, q_scores = dense.searcher.search(q_vecs, config.question_top_k)
    else:
        q_idx, q_scores = bm25.search(queries, config.question_top_k)
    flat = [(b, ri, text) for b, ex in enumerate(batch) for ri, text in (kept.get(ex.id, ()) if kept else ())]
    if flat:
        r_idx, r_scores = bm25.search([text for _, _, text in flat], config.rationale_top_k)
    per_question: list[list[int]] = [[] for _ in batch]
    for j, (b, _, _) in enumerate(flat):
        per_question[b].append(j)
    for b, ex in enumerate(batch):
        cand = [int(i) for i in q_idx[b]]
        cand_scores = [float(s) for s in q_scores[b]]
        rows_r = []
        for j in per_question[b]:
            _, ri, text = flat[j]
            rows_r.append({
                "question_id": ex.id, "rationale_index": ri, "rationale": text,
                "passage_ids": store.ids_of(r_idx[j]), "scores": [float(s) for s in r_scores[j]],
            })
        if config.union_rationale_candidates and per_question[b]:
            seen, extra = set(cand), []
            for j in per_question[b]:
                for i in map(int, r_idx[j]):
                    if i not in seen:
                        seen.add(i)
                        extra.append(i)
            if extra:
                if config.question_retriever == "dense":
                    extra_scores = dense.passage_vectors[np.asarray(extra)].astype(np.float32) @ q_vecs[b]
                else:
                    extra_scores = bm25.score_candidates(queries[b], extra)
                cand += extra
                cand_scores += [float(s) for s in extra_scores]
        labels = {}
        if per_question[b]:
            label_scores = bm25.score_candidates_batch([flat[j][2] for j in per_question[b]], cand)
            labels = {str(flat[j][1]): [float(s) for s in row] for j, row in zip(per_question[b], label_scores)}
        row_q = {"question_id": ex.id, "candidate_ids": store.ids_of(cand), "question_scores": cand_scores,
                 "labels": labels}
        yield row_q, rows_r


def _read_shards(directory: str | os.PathLike, prefix: str) -> list[dict]:
    directory = pathlib.Path(directory)
    manifest = atomic.read_json(directory / "manifest.json")
    if manifest.get("format") != _FORMAT:
        raise InputError("not a retrieval cache", path=directory / "manifest.json", field="format")
    rows = []
    for name in manifest["files"]:
        if name.startswith(prefix + "-"):
            with open(directory / name, encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f)
    return rows


def read_rationale_retrieval(directory: str | os.PathLike) -> list[dict]:
    """All rationale rows in order (empty for an eval split)."""
    return _read_shards(directory, RATIONALE_PREFIX)


def read_question_candidates(directory: str | os.PathLike) -> list[dict]:
    """All question rows in example order."""
    return _read_shards(directory, QUESTION_PREFIX)
