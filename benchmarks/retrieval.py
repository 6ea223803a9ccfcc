"""Retrieval speed/quality figures (a script, not a test):

  python benchmarks/retrieval.py [--data ../shared/data] [--rank_bm25_queries 100]
                                 [--dense_n 200000 --dense_dim 384 --dense_queries 1000]

1. BM25 (bm25s index + our batched sparse search) queries/s at k=100 on each shared KB, with
   StrategyQA questions and teacher rationales as queries, next to rank_bm25's BM25Okapi (same
   k1/b, same tokens; its IDF is log((N - df + 0.5)/(df + 0.5)) floored at eps*mean, not Lucene's
   log(1 + ...)), and the top-10 overlap between the two.
2. ScaNN vs brute force on random unit vectors: build time, queries/s, recall@10.
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kard_jax.knowledge import bm25, run, scann_index  # noqa: E402

KBS = ["wikipedia_paragraphs_strategyqa.jsonl.gz", "wikipedia_summaries.jsonl.gz", "pubmed_abstracts.jsonl.gz"]


def strategyqa_queries(data: pathlib.Path) -> tuple[list[str], list[str]]:
    with open(data / "strategyqa" / "train.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line)["sent1"] for line in f]
    with gzip.open(data / "strategyqa" / "rationales.train.jsonl.gz", "rt", encoding="utf-8") as f:
        rationales = [r for line in f for r in json.loads(line)["rationales"][:2] if r.strip()]
    return questions, rationales


def bench_bm25(data: pathlib.Path, n_rank_bm25: int, tmp: pathlib.Path) -> None:
    from rank_bm25 import BM25Okapi

    questions, rationales = strategyqa_queries(data)
    print(f"BM25, k=100, k1=0.9 b=0.4; queries: {len(questions)} StrategyQA questions, "
          f"{len(rationales)} rationales (2 per question); rank_bm25 on the first {n_rank_bm25} of each")
    print(f"{'kb':42s} {'passages':>8s} {'build s':>8s} {'queries':>10s} {'bm25 q/s':>9s} "
          f"{'rank_bm25 q/s':>13s} {'top10 overlap':>13s}")
    for name in KBS:
        t = time.perf_counter()
        run.build_kb(corpus_paths=[str(data / "kb" / name)], kb_dir=str(tmp / name), skip_empty_text=True,
                     show_progress=False)
        build_s = time.perf_counter() - t
        store, index = run.load_kb(tmp / name)
        texts = [store.contents(i) for i in range(len(store))]
        t = time.perf_counter()
        okapi = BM25Okapi(bm25.tokenize(texts, index.config), k1=index.config.k1, b=index.config.b)
        okapi_build = time.perf_counter() - t
        for kind, queries in (("questions", questions), ("rationales", rationales)):
            t = time.perf_counter()
            idx, _ = index.search(queries, k=100)
            qps = len(queries) / (time.perf_counter() - t)
            sub = queries[:n_rank_bm25]
            t = time.perf_counter()
            ref = [np.argsort(-okapi.get_scores(toks), kind="stable")[:100] for toks in bm25.tokenize(sub, index.config)]
            rank_qps = len(sub) / (time.perf_counter() - t)
            overlap = np.mean([len(set(a[:10]) & set(r[:10])) / 10 for a, r in zip(idx[:n_rank_bm25], ref)])
            print(f"{name:42s} {len(store):8d} {build_s:8.2f} {kind:>10s} {qps:9.1f} {rank_qps:13.1f} {overlap:13.3f}")
        print(f"{'':42s} (rank_bm25 index build {okapi_build:.2f} s)")


def bench_dense(n: int, dim: int, n_queries: int) -> None:
    rng = np.random.default_rng(0)
    db = rng.standard_normal((n, dim)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.standard_normal((n_queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    print(f"\nDense MIPS, {n} x {dim} random unit vectors, {n_queries} queries, k=10")
    brute = scann_index.BruteForceSearcher(db)
    (exact, _), t = scann_index.timed(brute.search, q, 10)
    print(f"  brute force (numpy float32 matmul): build 0.00 s, {n_queries / t:9.1f} q/s, recall@10 1.000")
    config = scann_index.ScannConfig(brute_force_below=0)
    searcher, build_s = scann_index.timed(scann_index.ScannSearcher.build, db, config)
    print(f"  ScaNN build (tree {int(round(n ** 0.5))} leaves, AH dims/block 2, reorder "
          f"{config.reorder_num_neighbors}): {build_s:.2f} s")
    for fraction in (0.1, 0.3, 0.5):
        leaves = max(1, int(np.ceil(int(round(n ** 0.5)) * fraction)))
        (idx, _), t = scann_index.timed(searcher.search, q, 10, leaves_to_search=leaves)
        print(f"  ScaNN, {leaves:4d} leaves searched ({fraction:.0%}): {n_queries / t:9.1f} q/s, "
              f"recall@10 {scann_index.recall_at_k(idx, exact):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--rank_bm25_queries", type=int, default=100)
    parser.add_argument("--dense_n", type=int, default=200_000)
    parser.add_argument("--dense_dim", type=int, default=384)
    parser.add_argument("--dense_queries", type=int, default=1000)
    parser.add_argument("--skip_bm25", action="store_true")
    parser.add_argument("--skip_dense", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_bm25:
            bench_bm25(pathlib.Path(args.data), args.rank_bm25_queries, pathlib.Path(tmp))
    if not args.skip_dense:
        bench_dense(args.dense_n, args.dense_dim, args.dense_queries)


if __name__ == "__main__":
    main()
