"""The stored-passages reranker (a frozen document tower: the knowledge base's own dense
embeddings): scores equal the token path's when the stored vectors are the encoder's own, the
reranker task carries exactly the KB's rows for its candidates, and a MiniLM-initialised reranker
over a MiniLM knowledge base ranks BM25's candidates exactly as brute-force dense scoring does."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from kard_jax.errors import InputError
from kard_jax.models import bert, reranker

BERT_CFG = bert.preset_config("tiny", vocab_size=64)


def _tokens(rng, shape, length):
    out = np.zeros(shape + (length,), np.int32)
    for idx in np.ndindex(*shape):
        k = int(rng.integers(1, length + 1))
        out[idx][:k] = rng.integers(2, 64, k)
    return out


@pytest.mark.parametrize("lexical_weight", [None, 0.7])
def test_stored_vectors_score_as_the_encoded_candidates(lexical_weight):
    rng = np.random.default_rng(0)
    q, c = _tokens(rng, (3,), 6), _tokens(rng, (3, 5), 9)
    lexical = rng.normal(size=(3, 5)).astype(np.float32) if lexical_weight is not None else None
    encoded = reranker.RerankerModel(BERT_CFG, proj_dim=0, head="dual_encoder", tau2=0.1,
                                     lexical_weight=lexical_weight, neural_weight=1.3)
    stored = reranker.RerankerModel(BERT_CFG, proj_dim=0, head="dual_encoder", tau2=0.1,
                                    lexical_weight=lexical_weight, neural_weight=1.3, stored_passages=True)
    params = meta.unbox(encoded.get_initial_variables(jax.random.PRNGKey(1), {"query_tokens": (1, 6),
                                                                           "candidate_tokens": (1, 1, 9)})["params"])
    stored_params = meta.unbox(stored.get_initial_variables(jax.random.PRNGKey(5), {"query_tokens": (1, 6)})["params"])
    assert jax.tree.structure(stored_params) == jax.tree.structure(params)  # one checkpoint serves both
    vectors = np.asarray(encoded.module.apply({"params": params}, jnp.asarray(c), method=reranker.Reranker.embed))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    want = np.asarray(reranker.score_candidates(encoded, params, q, c, lexical))
    got = np.asarray(reranker.score_candidates(stored, params, q, None, lexical, vectors))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Training sees the same scores: the loss of the stored batch equals the token batch's.
    batch = {"query_tokens": q, "labels": rng.normal(size=(3, 5)).astype(np.float32),
             "candidate_mask": np.ones((3, 5), np.int32), **({"lexical_scores": lexical} if lexical is not None else {})}
    loss_tokens, _ = encoded.loss_fn(params, {**batch, "candidate_tokens": c}, None)
    loss_stored, _ = stored.loss_fn(params, {**batch, "candidate_vectors": vectors}, None)
    np.testing.assert_allclose(float(loss_stored), float(loss_tokens), rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(head="late_interaction", proj_dim=0), dict(head="dual_encoder", proj_dim=16)])
def test_stored_passages_needs_a_dual_encoder_in_the_encoders_own_space(kwargs):
    with pytest.raises(ValueError, match="stored_passages"):
        reranker.RerankerModel(BERT_CFG, stored_passages=True, **kwargs)


seqio = pytest.importorskip("seqio")


@pytest.fixture(scope="module")
def minilm_kb(tmp_path_factory):
    """The demo world's KB with MiniLM embeddings, its retrieval cache and rationales."""
    from tests.demo_worlds import world_with_rationales
    from kard_jax.knowledge import embed, retrieval_cache, run as knowledge

    root = tmp_path_factory.mktemp("stored")
    world_dir = world_with_rationales(root, train_entities=4, test_entities=2, seed=3)
    embedder = embed.bert_embedder_from_hf(max_length=64, batch_size=32)
    knowledge.build_kb(corpus_paths=[str(world_dir / "kb.jsonl")], kb_dir=str(root / "kb"), embedder=embedder,
                       show_progress=False)
    knowledge.retrieve(examples_path=str(world_dir / "train.jsonl"), kb_dir=str(root / "kb"),
                       output_dir=str(root / "retrieval"), rationales_path=str(root / "teacher"), dataset="demo",
                       config=retrieval_cache.RetrievalConfig(rationale_top_k=2, question_top_k=6),
                       show_progress=False)
    return root, world_dir, embedder


def _minilm_model(**kwargs):
    from kard_jax import hf_bert_io

    return reranker.RerankerModel(hf_bert_io.read_hf_config(hf_bert_io.minilm_dir()), proj_dim=0,
                                  head="dual_encoder", tau2=0.05, stored_passages=True, **kwargs)


def test_reranker_task_carries_the_kbs_vectors_of_its_candidates(minilm_kb):
    from kard_jax import hf_bert_io
    from kard_jax.knowledge import embed, run as knowledge
    from kard_jax.tasks import batch_iterator, feature_converters, registry

    root, world_dir, _ = minilm_kb
    register = lambda: registry.register_kard_tasks(  # noqa: E731
        "stored", train_path=str(world_dir / "train.jsonl"), vocab_path=str(hf_bert_io.minilm_dir()),
        rationales_path=str(root / "teacher"), retrieval_cache_dir=str(root / "retrieval"), kb_dir=str(root / "kb"),
        reranker_vocab_path=str(hf_bert_io.minilm_dir()), reranker_max_candidates=4, reranker_stored_passages=True,
        extra_ids=0, prompt_template="science")
    data = batch_iterator.SeqioBatchIterator(
        task="kard_stored_reranker", split="train", task_feature_lengths={"query": 32, "candidates": 16, "labels": 5},
        feature_converter=feature_converters.RerankerFeatureConverter(stored_passages=True), batch_size=4,
        shuffle=False, num_epochs=1, shard_index=0, num_shards=1, register=[register])
    store, _ = knowledge.load_kb(root / "kb")
    table = embed.load_embeddings(root / "kb" / "embeddings")
    records = [r for r in seqio.get_mixture_or_task("kard_stored_reranker").source.get_dataset(
        split="train", shuffle=False).as_numpy_iterator()]
    batches = list(data)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]
    assert len(rows) == len(records) > 0
    for record, row in zip(records, rows):
        ids = [x.decode() for x in record["candidate_ids"]]
        positions = store.indices_of(ids)
        assert row["candidate_vectors"].shape == (5, table.shape[1])
        np.testing.assert_array_equal(row["candidate_vectors"][:len(ids)], table[positions])
        assert not row["candidate_vectors"][len(ids):].any()  # padded slots
        assert row["candidate_mask"].tolist() == [1] * len(ids) + [0] * (5 - len(ids))
    # Without the setting the converter refuses the plain task's records.
    with pytest.raises(Exception, match="candidate_vectors"):
        registry.register_kard_tasks(
            "plain", train_path=str(world_dir / "train.jsonl"), vocab_path=str(hf_bert_io.minilm_dir()),
            rationales_path=str(root / "teacher"), retrieval_cache_dir=str(root / "retrieval"),
            kb_dir=str(root / "kb"), reranker_vocab_path=str(hf_bert_io.minilm_dir()), extra_ids=0,
            prompt_template="science")
        next(iter(batch_iterator.SeqioBatchIterator(
            task="kard_plain_reranker", split="train",
            task_feature_lengths={"query": 32, "candidates": 16, "labels": 5},
            feature_converter=feature_converters.RerankerFeatureConverter(stored_passages=True), batch_size=4,
            shuffle=False, num_epochs=1, shard_index=0, num_shards=1)))


def test_minilm_stored_reranker_ranks_bm25_candidates_as_dense_scoring(minilm_kb):
    from kard_jax import hf_bert_io
    from kard_jax.data.query import question_query
    from kard_jax.data.readers import read_examples
    from kard_jax.inference import passages, rerank

    root, world_dir, embedder = minilm_kb
    model = _minilm_model()
    params = reranker.hf_encoder_initializer(str(hf_bert_io.minilm_dir()), model=model)()
    kb = passages.KnowledgeBase(root / "kb")
    examples = read_examples(world_dir / "train.jsonl", format="kard", dataset="demo")[:10]
    bm25 = passages.bm25_ranker(kb, 8, "question")
    ranked = rerank.reranked_ranker(kb, bm25, model=model, params=params,
                                    tokenizer=hf_bert_io.load_tokenizer(hf_bert_io.minilm_dir()),
                                    query_length=64, batch_size=4)(examples)
    vectors = kb.passage_vectors()
    for example, row, got in zip(examples, bm25(examples), ranked):
        scores = vectors[row] @ embedder.embed([question_query(example, "question")])[0]  # brute force
        assert sorted(got) == sorted(row)
        assert got == [row[i] for i in np.argsort(-scores, kind="stable")]


def test_stored_passages_without_kb_embeddings_is_one_clear_error(tmp_path):
    from kard_jax.knowledge import run as knowledge
    from kard_jax.inference import passages

    corpus = tmp_path / "kb.jsonl"
    corpus.write_text(json.dumps({"id": "a", "title": "A", "text": "alpha beta"}) + "\n")
    knowledge.build_kb(corpus_paths=[str(corpus)], kb_dir=str(tmp_path / "kb"), show_progress=False)
    with pytest.raises(InputError, match="no passage embeddings"):
        passages.KnowledgeBase(tmp_path / "kb").passage_vectors()


def test_trained_stored_reranker_evaluates_with_its_initial_checkpoint_as_untrained(minilm_kb, tmp_path):
    """Train a MiniLM stored-passages hybrid two steps through the shared trainer, then evaluate:
    the "untrained reranker" row starts from the MiniLM initial checkpoint (not a random encoder),
    so with the hybrid weights at their start it equals BM25's candidates ordered by
    cos(question, passage) / tau2 + lexical_weight * z(BM25), computed here by brute force."""
    from kard_jax import hf_bert_io
    from kard_jax.data.query import question_query
    from kard_jax.data.readers import read_examples
    from kard_jax.inference import passages, reranker_eval
    from kard_jax.models.reranker import lexical_features
    from kard_jax.tasks import batch_iterator, feature_converters, registry
    from kard_jax.training import optimizers, partitioning, trainer

    root, world_dir, embedder = minilm_kb
    register = lambda: registry.register_kard_tasks(  # noqa: E731
        "stored2", train_path=str(world_dir / "train.jsonl"), vocab_path=str(hf_bert_io.minilm_dir()),
        rationales_path=str(root / "teacher"), retrieval_cache_dir=str(root / "retrieval"), kb_dir=str(root / "kb"),
        reranker_vocab_path=str(hf_bert_io.minilm_dir()), reranker_max_candidates=6, reranker_stored_passages=True,
        reranker_candidate_pool="question", extra_ids=0, prompt_template="science")
    data = batch_iterator.SeqioBatchIterator(
        task="kard_stored2_reranker", split="train", task_feature_lengths={"query": 32, "candidates": 4, "labels": 6},
        feature_converter=feature_converters.RerankerFeatureConverter(stored_passages=True), batch_size=8,
        shard_index=0, num_shards=1, register=[register])
    model = _minilm_model(lexical_weight=1.0)
    initial = reranker.hf_encoder_initializer(str(hf_bert_io.minilm_dir()), model=model)
    trainer.train(model_dir=tmp_path / "rr", model=model, train_data=data, train_steps=2, save_period=2,
                  mesh_config=partitioning.MeshConfig(data=8, model=1), optimizer=optimizers.adamw(1e-4),
                  initial_checkpoint=initial, async_checkpointing=False)
    metrics = reranker_eval.eval_reranker(
        examples_path=str(world_dir / "train.jsonl"), rationales_path=str(root / "teacher"), kb_dir=str(root / "kb"),
        out_dir=str(tmp_path / "eval"), n_candidates=6, dataset="demo", reranker=model,
        reranker_checkpoint=str(tmp_path / "rr"), vocab_path=str(hf_bert_io.minilm_dir()), query_length=32,
        initial_checkpoint=initial)
    kb = passages.KnowledgeBase(root / "kb")
    examples = read_examples(world_dir / "train.jsonl", format="kard", dataset="demo")
    rationales = __import__("kard_jax.teacher.store", fromlist=["x"]).read_rationales(root / "teacher")
    silver = reranker_eval.silver_sets(kb, rationales, [e.id for e in examples])
    bm25 = passages.bm25_ranker(kb, 6, "question")
    vectors = kb.passage_vectors()

    def brute_force(exs):
        out = []
        for e, row in zip(exs, bm25(exs)):
            cos = vectors[row] @ embedder.embed([question_query(e, "question")])[0]
            score = cos / 0.05 + 1.0 * lexical_features(kb.bm25.score_candidates(question_query(e, "question"), row))
            out.append([row[i] for i in np.argsort(-score, kind="stable")])
        return out

    want = reranker_eval.evaluate_rankers(examples, {"brute force": brute_force}, silver)["brute force"]
    got = metrics["rankings"]["untrained reranker"]
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert set(metrics["rankings"]) == {"bm25", "reranked", "untrained reranker", "random order"}
