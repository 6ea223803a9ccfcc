"""Dense retrieval: ScaNN recall vs brute force, serialization, exact search, T5 embedder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from kard_jax.knowledge import embed, scann_index
from kard_jax.models import t5


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_brute_force_is_exact_vs_numpy_argsort():
    rng = np.random.default_rng(1)
    db, q = _unit(rng, 3000, 32), _unit(rng, 37, 32)
    searcher = scann_index.BruteForceSearcher(db, query_block=16)
    idx, scores = searcher.search(q, 10)
    full = q @ db.T
    ref = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(full, ref, 1), rtol=1e-6)


def test_small_corpus_uses_brute_force(tmp_path):
    rng = np.random.default_rng(2)
    db = _unit(rng, 500, 16)
    searcher = scann_index.build_dense_index(db, scann_index.ScannConfig(brute_force_below=1000))
    assert searcher.kind == "brute_force"
    searcher.save(tmp_path / "bf")
    loaded = scann_index.load_dense_index(tmp_path / "bf")
    q = _unit(rng, 5, 16)
    np.testing.assert_array_equal(loaded.search(q, 7)[0], searcher.search(q, 7)[0])


@pytest.mark.timeout(120)
def test_scann_recall_and_serialization(tmp_path):
    pytest.importorskip("scann")
    rng = np.random.default_rng(0)
    db, q = _unit(rng, 20_000, 64), _unit(rng, 200, 64)
    exact, _ = scann_index.BruteForceSearcher(db).search(q, 10)
    # Random unit vectors have no cluster structure, the worst case for tree partitioning:
    # search 70% of the leaves and reorder 500 candidates exactly.
    config = scann_index.ScannConfig(num_leaves=100, leaves_to_search_fraction=0.7, reorder_num_neighbors=500,
                                     brute_force_below=1000)
    searcher = scann_index.build_dense_index(db, config)
    assert searcher.kind == "scann"
    idx, scores = searcher.search(q, 10)
    recall = scann_index.recall_at_k(idx, exact)
    print(f"ScaNN recall@10 on 20k x 64 random unit vectors: {recall:.4f}")
    assert recall >= 0.95
    # Reordered scores are exact inner products of the returned vectors.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, db[idx]), rtol=1e-4, atol=1e-5)
    searcher.save(tmp_path / "scann")
    loaded = scann_index.load_dense_index(tmp_path / "scann")
    idx2, scores2 = loaded.search(q, 10)
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(scores2, scores)


def test_t5_embedder_matches_unsharded_reference(tmp_path):
    assert len(jax.devices()) == 8
    config = t5.T5Config.from_preset("tiny", vocab_size=64, d_model=32, d_kv=8, d_ff=64)
    model = t5.T5(config)
    tokens0 = jnp.ones((2, 8), jnp.int32)
    params = meta.unbox(model.init(jax.random.PRNGKey(0), tokens0, tokens0)["params"])

    def tokenize(text):  # toy tokenizer: one id per character, 2..63, then EOS (1)
        return [2 + ord(c) % 62 for c in text] + [1]

    texts = ["hello world", "a", "the quick brown fox jumps", "zz", "kard", "x y z", "retrieval", "t5", "ninth"]
    embedder = embed.T5Embedder(config, params, tokenize, max_length=16, batch_size=8)
    got = embedder.embed(texts)
    assert got.shape == (9, 32)
    for text, vec in zip(texts, got):  # reference: one text at a time, no padding rows, numpy pooling
        ids = jnp.array([tokenize(text)[:16]], jnp.int32)
        enc = np.asarray(model.apply({"params": params}, ids, method=t5.T5.encode))[0]
        mean = enc.mean(axis=0)
        np.testing.assert_allclose(vec, mean / np.linalg.norm(mean), rtol=2e-4, atol=2e-5)
    # Shards + manifest on disk round trip.
    embed.embed_passages(lambda i: texts[i], len(texts), embedder, tmp_path / "emb", shard_size=4,
                         dtype="float16", show_progress=False)
    names = sorted(p.name for p in (tmp_path / "emb").glob("*.npy"))
    assert names == [f"embeddings-{i:05d}-of-00003.npy" for i in range(3)]
    np.testing.assert_allclose(embed.load_embeddings(tmp_path / "emb"), got, atol=2e-3)
