"""The late-interaction reranker: ColBERT scoring vs brute force, the KL loss vs numpy, gradients
reaching the encoder, training through the shared trainer, and inference-time reranking."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax.core import meta

from kard_jax.data import prompts
from kard_jax.data.query import question_query
from kard_jax.data.example import Example
from kard_jax.inference import passages as passages_lib, rerank
from kard_jax.knowledge import run as knowledge_run
from kard_jax.models import reranker, t5
from kard_jax.tokenizer import Tokenizer
from kard_jax.training import data_iterator, metrics, optimizers, partitioning, trainer

CFG = t5.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                  num_decoder_layers=2)
PROJ = 16


def _init(model, seed=0, lq=6, n=4, lc=7):
    boxed = model.get_initial_variables(jax.random.PRNGKey(seed), {"query_tokens": (1, lq), "candidate_tokens": (1, n, lc)})
    return meta.unbox(boxed["params"])


def _pad_rows(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@pytest.fixture(scope="module")
def small_batch():
    """2 queries (one padded), 4 candidate slots of mixed lengths; query 1's last slot is empty."""
    rng = np.random.default_rng(0)
    queries = _pad_rows([rng.integers(2, 100, 5), rng.integers(2, 100, 2)], 6)
    cands = np.zeros((2, 4, 7), np.int32)
    lengths = [[7, 1, 3, 2], [1, 5, 2, 0]]
    for b in range(2):
        for i, n in enumerate(lengths[b]):
            cands[b, i, :n] = rng.integers(2, 100, n)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32)
    labels = np.array([[3.0, 0.5, 7.0, 2.0], [1.0, 4.0, 4.5, 99.0]], np.float32)  # 99: a padded slot
    return {"query_tokens": queries, "candidate_tokens": cands, "labels": labels, "candidate_mask": mask}


def _numpy_token_vectors(t5_params, proj_kernel, tokens):
    """The student's T5 encoder (t5.T5.encode) + numpy projection and L2 normalisation."""
    hidden = np.asarray(t5.T5(CFG).apply({"params": t5_params}, jnp.asarray(tokens), method=t5.T5.encode), np.float64)
    v = hidden @ np.asarray(proj_kernel, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_scores_equal_brute_force_maxsim_from_a_student_encoder(small_batch):
    model = reranker.RerankerModel(CFG, proj_dim=PROJ)
    student = t5.T5(CFG).init(jax.random.PRNGKey(3), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    student = meta.unbox(student["params"])
    params = reranker.params_with_t5_encoder(_init(model), student)  # same names: the student's encoder loads
    q, c = small_batch["query_tokens"], small_batch["candidate_tokens"]
    got = np.asarray(reranker.score_candidates(model, params, q, c))

    kernel = params["projection"]["kernel"]
    qv = _numpy_token_vectors(student, kernel, q)
    cv = _numpy_token_vectors(student, kernel, c.reshape(-1, c.shape[-1])).reshape(c.shape + (PROJ,))
    want = np.zeros(got.shape)
    negative_best = 0
    for b in range(q.shape[0]):
        for i in range(c.shape[1]):
            real_c = [j for j in range(c.shape[2]) if c[b, i, j] != 0]
            for t in range(q.shape[1]):
                if q[b, t] == 0 or not real_c:
                    continue
                best = max(float(qv[b, t] @ cv[b, i, j]) for j in real_c)
                negative_best += best < 0
                want[b, i] += best
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert want[1, 3] == 0.0 and got[1, 3] == 0.0  # an empty candidate slot
    # Some max-sims are negative, so a zero padding vector winning the max would change the scores.
    assert negative_best > 0
    # Extra padding changes nothing: padded query tokens add nothing, padded passage tokens never win.
    wider = reranker.score_candidates(model, params, np.pad(q, ((0, 0), (0, 5))), np.pad(c, ((0, 0), (0, 0), (0, 4))))
    np.testing.assert_allclose(np.asarray(wider), got, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="encoder"):
        reranker.params_with_t5_encoder(params, {**student, "encoder": {"layers_0": student["encoder"]["layers_0"]}})


def _numpy_kl_and_metrics(scores, labels, mask, tau1, tau2):
    kls, top1, rr = [], [], []
    for s, y, m in zip(scores, labels, mask.astype(bool)):
        s, y = s[m].astype(np.float64), y[m].astype(np.float64)
        p = np.exp(y / tau1 - np.max(y / tau1))
        p /= p.sum()
        logq = s / tau2 - np.max(s / tau2)
        logq -= np.log(np.exp(logq).sum())
        kls.append(float(np.sum(p * (np.log(p) - logq))))
        top1.append(float(y[np.argmax(s)] == y.max()))
        order = list(np.argsort(-s, kind="stable"))
        rr.append(1.0 / (order.index(int(np.argmax(y))) + 1))
    return np.mean(kls), np.mean(top1), np.mean(rr)


def test_kl_loss_metrics_and_gradients_match_numpy(small_batch):
    tau1, tau2 = 2.0, 0.5
    # Raw labels (Eq. 3 as written); the default per-question standardisation is tested in
    # tests/test_reranker_backbones.py.
    model = reranker.RerankerModel(CFG, proj_dim=PROJ, tau1=tau1, tau2=tau2, label_normalization="none")
    params = _init(model, seed=1)
    batch = {k: jnp.asarray(v) for k, v in small_batch.items()}
    scores = np.asarray(reranker.score_candidates(model, params, batch["query_tokens"], batch["candidate_tokens"]))
    loss, aux = model.loss_fn(params, batch, None)
    kl, top1, mrr = _numpy_kl_and_metrics(scores, small_batch["labels"], small_batch["candidate_mask"], tau1, tau2)
    assert kl > 0.01
    np.testing.assert_allclose(float(loss), kl, rtol=1e-4)
    np.testing.assert_allclose([float(aux["top1_agreement"]), float(aux["mrr"])], [top1, mrr], rtol=1e-6)
    assert float(aux["loss_denominator"]) == 2.0 and 0.0 < float(aux["ndcg"]) <= 1.0
    np.testing.assert_allclose(np.asarray(model.score_batch(params, batch)).mean(), -kl, rtol=1e-4)

    # Labels whose tempered distribution equals the scores' one: zero loss (masked labels ignored).
    matched = dict(batch, labels=jnp.where(batch["candidate_mask"] > 0, jnp.asarray(scores) * tau1 / tau2, -50.0))
    loss0, aux0 = model.loss_fn(params, matched, None)
    assert abs(float(loss0)) < 1e-5 and float(aux0["top1_agreement"]) == 1.0 and float(aux0["mrr"]) == 1.0

    # Every encoder parameter (both stacks' inputs: queries and passages) receives gradient.
    grads = jax.grad(lambda p: model.loss_fn(p, batch, jax.random.PRNGKey(0))[0])(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
    assert set(grads) == {"token_embedder", "encoder", "projection"}
    # Both sides are trained: embedding rows of tokens seen only in passages (the document encoder
    # the KARD release froze) or only in queries get gradient.
    q_ids, c_ids = set(small_batch["query_tokens"].ravel()) - {0}, set(small_batch["candidate_tokens"].ravel()) - {0}
    row_norm = np.abs(np.asarray(grads["token_embedder"]["embedding"])).sum(axis=1)
    assert c_ids - q_ids and q_ids - c_ids
    assert all(row_norm[t] > 0 for t in (c_ids - q_ids) | (q_ids - c_ids))
    assert all(row_norm[t] == 0 for t in set(range(CFG.vocab_size)) - q_ids - c_ids - {0})
    with pytest.raises(ValueError, match="tau2"):
        reranker.RerankerModel(CFG, tau2=-0.1)


def _pairing_examples(num, seed, n=6, lq=5, lc=8, half=24):
    """Token t (2..25) and its partner t + 24 "mean" the same; a candidate's label is how many of
    its tokens are partners of query tokens (distinct 0..real-1; some slots padded). No candidate
    repeats a query token, so an untrained encoder (which matches identical tokens) is at chance."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        base = rng.permutation(np.arange(2, 2 + half))
        query, others = base[:lq], base[lq:] + half
        partners = query + half
        real = int(rng.integers(4, n + 1))
        overlaps = rng.permutation(real)
        cands = np.zeros((n, lc), np.int32)
        for i, k in enumerate(overlaps):
            row = np.concatenate([rng.choice(partners, k, replace=False), rng.choice(others, lc - k, replace=False)])
            cands[i] = rng.permutation(row)
        labels = np.zeros(n, np.float32)
        labels[:real] = overlaps
        mask = (np.arange(n) < real).astype(np.int32)
        out.append({"query_tokens": query.astype(np.int32), "candidate_tokens": cands, "labels": labels,
                    "candidate_mask": mask})
    return out


def test_trains_through_the_shared_trainer_and_learns_to_rank(tmp_path):
    model = reranker.RerankerModel(CFG, proj_dim=PROJ, tau1=0.5, tau2=0.5)
    train = data_iterator.InMemoryBatchIterator(_pairing_examples(3200, seed=0), batch_size=16, seed=0)
    held_out = _pairing_examples(64, seed=1)
    eval_data = data_iterator.InMemoryBatchIterator(held_out, batch_size=16, shuffle=False, num_epochs=1)
    untrained = model.eval_fn(_init(model, seed=5), {k: jnp.asarray(np.stack([e[k] for e in held_out]))
                                                      for k in held_out[0]})[1]
    state = trainer.train(
        model_dir=tmp_path, model=model, train_data=train, eval_data=eval_data, train_steps=200, eval_period=200,
        log_period=20, save_period=200, mesh_config=partitioning.MeshConfig(data=8, model=1),
        optimizer=optimizers.adamw(3e-3), async_checkpointing=False,
    )
    assert int(state.step) == 200
    _, loss = metrics.read_scalars(tmp_path / "train")["loss"]
    ev = {k: float(v[1][-1]) for k, v in metrics.read_scalars(tmp_path / "eval").items()}
    chance = float(np.mean([1.0 / e["candidate_mask"].sum() for e in held_out]))
    print(json.dumps({"train_loss_first5": float(loss[:5].mean()), "train_loss_last5": float(loss[-5:].mean()),
                      "untrained_top1": float(untrained["top1_agreement"]), "chance_top1": chance,
                      "held_out": ev}))
    assert loss[-5:].mean() < 0.5 * loss[:5].mean()
    assert ev["top1_agreement"] > max(0.75, float(untrained["top1_agreement"]) + 0.3, 2 * chance)
    assert ev["mrr"] > float(untrained["mrr"]) and ev["loss"] < float(untrained["loss"])


@pytest.fixture(scope="module")
def tiny_kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank_kb")
    words = ("camel desert sand water oasis penguin ice snow fish ocean cactus thorn rain forest frog "
             "moss tundra reindeer whale salt").split()
    rng = np.random.default_rng(0)
    docs = [{"id": f"d{i}", "title": f"{words[i]}", "text": " ".join(rng.choice(words, 10))} for i in range(14)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    knowledge_run.build_kb(corpus_paths=[str(root / "corpus.jsonl")], kb_dir=str(root / "kb"), show_progress=False)
    (root / "spm.txt").write_text("\n".join(" ".join(rng.choice(words + ["question"], 8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(root / "spm.txt"), model_prefix=str(root / "spiece"), vocab_size=60, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return root / "kb", Tokenizer(root / "spiece.model")


def test_reranked_passages_are_bm25_candidates_in_model_score_order(tiny_kb):
    kb_dir, tok = tiny_kb
    model = reranker.RerankerModel(CFG, proj_dim=PROJ)
    params = _init(model, seed=2)
    examples = [Example(f"q{i}", q, ("yes", "no"), 0) for i, q in
                enumerate(["where does the camel find water", "penguin eats fish in the ocean", "frog in rain forest"])]
    n_candidates, n_docs, lq, lc = 6, 3, 16, 24
    passages_for = rerank.reranked_passages(kb_dir, model=model, params=params, tokenizer=tok, n_candidates=n_candidates,
                                            n_docs=n_docs, query_length=lq, candidate_length=lc, batch_size=2)
    got = passages_for(examples)
    store, bm25 = knowledge_run.load_kb(kb_dir)
    indices, _ = bm25.search([question_query(e) for e in examples], k=n_candidates)
    reordered = 0
    for e, row, chosen in zip(examples, indices, got):
        texts = [prompts.format_passage(p.title, p.text) for p in store.get_many(row)]
        assert len(chosen) == n_docs and set(chosen) <= set(texts)
        # Independent reference: score this question alone (batch of 1, no batch padding).
        q = tok.batch_encode([question_query(e)], lq)  # the default query form
        c = tok.batch_encode(texts, lc)[None]
        scores = np.asarray(reranker.score_candidates(model, params, q, c))[0]
        want = [texts[i] for i in np.argsort(-scores, kind="stable")[:n_docs]]
        assert chosen == want
        reordered += chosen != texts[:n_docs]
    assert reordered > 0  # the reranker, not BM25, decided the order
    assert passages_for([]) == []
    with pytest.raises(ValueError, match="n_docs"):
        rerank.reranked_passages(kb_dir, model=model, params=params, tokenizer=tok, n_candidates=2, n_docs=3,
                                 query_length=lq, candidate_length=lc, batch_size=2)


def test_lexical_features_are_z_scores_over_the_question_list():
    scores = [9.0, 5.0, 1.0, 0.0, 30.0]  # the last two: rationale extras outside the question's top 3
    mean, std = 5.0, np.sqrt(((9 - 5) ** 2 + 0 + (1 - 5) ** 2) / 3)
    np.testing.assert_allclose(reranker.lexical_features(scores, 3), [(s - mean) / std for s in scores], rtol=1e-6)
    np.testing.assert_allclose(reranker.lexical_features(scores[:3]), [4 / std, 0.0, -4 / std], rtol=1e-6)
    assert reranker.lexical_features([2.0, 2.0]).tolist() == [0.0, 0.0]  # nothing to tell apart
    assert reranker.lexical_features([]).shape == (0,)


def test_hybrid_score_is_encoder_score_plus_trained_weight_times_feature(small_batch):
    hybrid = reranker.RerankerModel(CFG, proj_dim=PROJ, tau2=0.5, lexical_weight=2.0)
    params = _init(hybrid)
    assert float(params["lexical_weight"]) == 1.0  # tau2 * lexical_weight: score units
    assert float(params["neural_weight"]) == 1.0  # the default: the encoder score as is
    plain = reranker.RerankerModel(CFG, proj_dim=PROJ, tau2=0.5)
    plain_params = {k: v for k, v in params.items() if k not in ("lexical_weight", "neural_weight")}
    lexical = np.array([[1.5, -0.5, 0.0, -1.0], [0.3, 2.0, -2.3, 0.0]], np.float32)
    batch = {**small_batch, "lexical_scores": lexical}
    params = {**params, "lexical_weight": jnp.asarray(0.75, jnp.float32), "neural_weight": jnp.asarray(-1.5, jnp.float32)}
    got = np.asarray(reranker.score_candidates(hybrid, params, batch["query_tokens"], batch["candidate_tokens"], lexical))
    neural = np.asarray(reranker.score_candidates(plain, plain_params, batch["query_tokens"], batch["candidate_tokens"]))
    np.testing.assert_allclose(got, -1.5 * neural + 0.75 * lexical, rtol=1e-5, atol=1e-6)
    # Both weights are trained: the KL gradient reaches them.
    grads = jax.grad(lambda p: hybrid.loss_fn(p, {k: jnp.asarray(v) for k, v in batch.items()}, None)[0])(params)
    assert abs(float(grads["lexical_weight"])) > 1e-6 and abs(float(grads["neural_weight"])) > 1e-6
    with pytest.raises(ValueError, match="lexical_scores"):
        reranker.score_candidates(hybrid, params, batch["query_tokens"], batch["candidate_tokens"])
    assert reranker.uses_lexical_scores(hybrid) and not reranker.uses_lexical_scores(plain)


def test_hybrid_reranker_dominated_by_its_lexical_weight_ranks_like_bm25(tiny_kb):
    """Inference feeds the hybrid reranker each candidate's BM25 against the question query: with
    the lexical weight far above the encoder's score range, the reranked order is BM25's."""
    kb_dir, tok = tiny_kb
    model = reranker.RerankerModel(CFG, proj_dim=PROJ, lexical_weight=1.0)
    params = {**_init(model, seed=2), "lexical_weight": jnp.asarray(1e4, jnp.float32)}
    examples = [Example(f"q{i}", q, ("yes", "no"), 0) for i, q in
                enumerate(["where does the camel find water", "penguin eats fish in the ocean", "frog in rain forest"])]
    kb = passages_lib.KnowledgeBase(kb_dir)
    candidates = passages_lib.bm25_ranker(kb, 8, "question")
    ranked = rerank.reranked_ranker(kb, candidates, model=model, params=params, tokenizer=tok, query_length=16,
                                    candidate_length=24, batch_size=2)(examples)
    for e, row, bm25_row in zip(examples, ranked, candidates(examples)):
        assert sorted(row) == sorted(bm25_row)
        scores = kb.bm25.score_candidates(question_query(e), row)
        assert np.all(np.diff(scores) <= 1e-5), scores  # non-increasing BM25 along the reranked list
    # And with the weight at 0 the encoder alone decides (same as a plain reranker's order).
    zero = {**params, "lexical_weight": jnp.asarray(0.0, jnp.float32)}
    plain = reranker.RerankerModel(CFG, proj_dim=PROJ)
    plain_params = {k: v for k, v in params.items() if k not in ("lexical_weight", "neural_weight")}
    kwargs = dict(tokenizer=tok, query_length=16, candidate_length=24, batch_size=2)
    assert (rerank.reranked_ranker(kb, candidates, model=model, params=zero, **kwargs)(examples)
            == rerank.reranked_ranker(kb, candidates, model=plain, params=plain_params, **kwargs)(examples))


def test_restoring_a_hybrid_checkpoint_into_a_plain_reranker_names_the_setting():
    from kard_jax.training import checkpoints

    hybrid = reranker.RerankerModel(CFG, proj_dim=PROJ, lexical_weight=1.0)
    plain = reranker.RerankerModel(CFG, proj_dim=PROJ)
    shapes = {"query_tokens": (1, 4), "candidate_tokens": (1, 2, 4)}
    saved, want = (jax.eval_shape(lambda m=m: meta.unbox(m.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]))
                   for m in (hybrid, plain))
    with pytest.raises(checkpoints.CheckpointMismatchError, match="hybrid reranker.*set LEXICAL_WEIGHT"):
        checkpoints.check_params_match(saved, want, "ckpt", "fix")
    with pytest.raises(checkpoints.CheckpointMismatchError, match="without the lexical feature"):
        checkpoints.check_params_match(want, saved, "ckpt", "fix")


def test_hybrid_starting_at_neural_weight_zero_is_exactly_the_lexical_ranking(small_batch):
    """NEURAL_WEIGHT = 0 starts the hybrid as the first-stage ranking (scores = w * feature), and the
    first gradient moves the encoder's weight off 0 (the encoder's own gradients are 0 there)."""
    model = reranker.RerankerModel(CFG, proj_dim=PROJ, tau2=0.5, lexical_weight=1.0, neural_weight=0.0)
    params = _init(model)
    assert float(params["neural_weight"]) == 0.0
    lexical = np.array([[1.5, -0.5, 0.0, -1.0], [0.3, 2.0, -2.3, 0.0]], np.float32)
    got = np.asarray(reranker.score_candidates(model, params, small_batch["query_tokens"],
                                               small_batch["candidate_tokens"], lexical))
    np.testing.assert_allclose(got, 0.5 * lexical, rtol=1e-6, atol=1e-7)
    batch = {k: jnp.asarray(v) for k, v in {**small_batch, "lexical_scores": lexical}.items()}
    grads = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
    assert abs(float(grads["neural_weight"])) > 1e-6
    encoder_grads = [g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0] if "encoder" in jax.tree_util.keystr(p)]
    assert encoder_grads and all(float(jnp.max(jnp.abs(g))) == 0.0 for g in encoder_grads)
    with pytest.raises(ValueError, match="neural_weight"):
        reranker.RerankerModel(CFG, proj_dim=PROJ, lexical_weight=1.0, neural_weight=float("nan"))
