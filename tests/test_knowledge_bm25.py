"""BM25: scores against a hand computation, candidate scoring, save/load."""
import math

import numpy as np
import pytest

from kard_jax.knowledge import bm25

# Tokenization is trivially controlled: lower-case words of 2+ letters, no stopwords.
CONFIG = bm25.BM25Config(k1=0.9, b=0.4, method="lucene", stopwords=None)
DOCS = [
    "apple banana apple",             # d0: len 3, tf(apple)=2
    "banana cherry",                  # d1: len 2, tf(cherry)=1
    "apple cherry cherry date",       # d2: len 4, tf(apple)=1, tf(cherry)=2
    "date",                           # d3: len 1
    "eggplant banana apple fig fig",  # d4: len 5, tf(apple)=1
]


def _hand_scores_apple_cherry():
    """score(q="apple cherry", d), written out: N=5, avgdl=15/5=3, df(apple)=3, df(cherry)=2."""
    k1, b, n, avgdl = 0.9, 0.4, 5, 3.0
    idf_apple = math.log(1 + (n - 3 + 0.5) / (3 + 0.5))
    idf_cherry = math.log(1 + (n - 2 + 0.5) / (2 + 0.5))

    def tfn(tf, dl):
        return tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))

    return np.array([
        idf_apple * tfn(2, 3),                           # d0
        idf_cherry * tfn(1, 2),                          # d1
        idf_apple * tfn(1, 4) + idf_cherry * tfn(2, 4),  # d2
        0.0,                                             # d3
        idf_apple * tfn(1, 5),                           # d4
    ])


@pytest.fixture(scope="module")
def index():
    return bm25.BM25Index.build(DOCS, CONFIG, show_progress=False)


def test_tokenize_is_controlled():
    assert bm25.tokenize(["The Apple, a  CHERRY!"], CONFIG) == [["the", "apple", "cherry"]]
    assert bm25.tokenize(["The apple and a cherry"], bm25.BM25Config()) == [["apple", "cherry"]]


def test_scores_match_hand_computation(index):
    expected = _hand_scores_apple_cherry()
    idx, scores = index.search(["apple cherry"], k=5)
    np.testing.assert_array_equal(idx[0], np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose(scores[0], np.sort(expected)[::-1], rtol=1e-5, atol=1e-6)


def test_repeated_query_terms_count_twice(index):
    _, once = index.search(["date"], k=1)
    _, twice = index.search(["date date"], k=1)
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-6)


def test_score_candidates_equals_search(index):
    queries = ["apple cherry", "banana fig", "date apple", "unknownword"]
    idx, scores = index.search(queries, k=5)
    for q, row_idx, row_scores in zip(queries, idx, scores):
        np.testing.assert_allclose(index.score_candidates(q, row_idx), row_scores, rtol=1e-6, atol=1e-7)
    batch = index.score_candidates_batch(queries, [4, 0, 2])
    np.testing.assert_allclose(batch[0], _hand_scores_apple_cherry()[[4, 0, 2]], rtol=1e-5)


def test_k_larger_than_corpus_and_no_match(index):
    idx, scores = index.search(["zebra"], k=10)
    assert idx.shape == (1, 5) and idx[0].tolist() == [0, 1, 2, 3, 4]
    assert not scores.any()
    idx, scores = index.search(["fig"], k=3)  # one match, then zero-score passages in index order
    assert idx[0].tolist() == [4, 0, 1] and scores[0, 0] > 0 and not scores[0, 1:].any()


def test_agrees_with_bm25s_retrieve(index):
    """Same ranking as bm25s' own retrieve, whose scores lack the constant (k1 + 1)."""
    docs, raw = index.retriever.retrieve([["apple", "cherry"]], k=4, show_progress=False)
    idx, scores = index.search(["apple cherry"], k=4)
    np.testing.assert_array_equal(docs, idx)
    np.testing.assert_allclose(raw * (CONFIG.k1 + 1), scores, rtol=1e-6)


def test_save_load_round_trip(index, tmp_path):
    index.save(tmp_path / "bm25")
    loaded = bm25.BM25Index.load(tmp_path / "bm25")
    assert loaded.config == CONFIG
    for q in ["apple cherry", "banana", "fig date"]:
        a, b = index.search([q], k=5), loaded.search([q], k=5)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
