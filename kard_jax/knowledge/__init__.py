"""kard_jax.knowledge: corpus ingestion, passage store, BM25, T5 embeddings, ScaNN, retrieval cache.

Modules: corpus (readers, chunking), passage_store (memory-mapped store), bm25, embed (T5 encoder
embedder), scann_index (ScaNN / brute force), retrieval_cache (the cache stage and its readers),
run (gin-bound run modes build_kb / retrieve), atomic (temp dir + os.replace helpers).
"""
