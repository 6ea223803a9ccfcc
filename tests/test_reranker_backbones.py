"""The reranker on both backbones (T5 encoder, BERT-family encoder) and both heads (late
interaction, dual encoder): scores vs numpy references, training through the shared trainer with
the same KL loss, and the per-question label standardisation of the target distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from kard_jax import hf_bert_io
from kard_jax.models import bert, reranker, t5
from kard_jax.training import data_iterator, metrics, optimizers, partitioning, trainer

T5_CFG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2)
BERT_CFG = bert.preset_config("tiny", vocab_size=64)
BACKBONES = {"t5": T5_CFG, "bert": BERT_CFG}


def _init(model, seed=0):
    shapes = {"query_tokens": (1, 6), "candidate_tokens": (1, 4, 7)}
    return meta.unbox(model.get_initial_variables(jax.random.PRNGKey(seed), shapes)["params"])


def _batch(seed=0, b=8, n=4, lq=6, lc=7):
    rng = np.random.default_rng(seed)
    q = np.zeros((b, lq), np.int32)
    c = np.zeros((b, n, lc), np.int32)
    for i in range(b):
        k = int(rng.integers(2, lq + 1))
        q[i, :k] = rng.integers(2, 64, k)
        for j in range(n):
            m = int(rng.integers(1, lc + 1))
            c[i, j, :m] = rng.integers(2, 64, m)
    mask = np.ones((b, n), np.int32)
    mask[1, -1] = 0
    c[1, -1] = 0
    labels = rng.normal(size=(b, n)).astype(np.float32) * 3
    return {"query_tokens": q, "candidate_tokens": c, "labels": labels, "candidate_mask": mask}


def _hidden(cfg, encoder_params, tokens):
    """The backbone's own encoder outside the reranker (t5.T5.encode / bert.BertEncoder)."""
    if isinstance(cfg, t5.T5Config):
        t5_params = {"token_embedder": encoder_params["token_embedder"], "encoder": encoder_params["encoder"]}
        fake_decoder = meta.unbox(t5.T5(cfg).init(jax.random.PRNGKey(9), jnp.ones((1, 2), jnp.int32),
                                                  jnp.ones((1, 2), jnp.int32))["params"])["decoder"]
        return np.asarray(t5.T5(cfg).apply({"params": {**t5_params, "decoder": fake_decoder}}, jnp.asarray(tokens),
                                           method=t5.T5.encode), np.float64)
    return np.asarray(bert.BertEncoder(cfg).apply({"params": encoder_params["encoder"]}, jnp.asarray(tokens)),
                      np.float64)


@pytest.mark.parametrize("backbone", ["t5", "bert"])
@pytest.mark.parametrize("head", ["late_interaction", "dual_encoder"])
def test_scores_match_numpy_reference(backbone, head):
    cfg = BACKBONES[backbone]
    model = reranker.RerankerModel(cfg, proj_dim=16, head=head)
    params = _init(model, seed=1)
    batch = _batch(seed=2, b=2)
    got = np.asarray(reranker.score_candidates(model, params, batch["query_tokens"], batch["candidate_tokens"]))
    q, c = batch["query_tokens"], batch["candidate_tokens"]
    kernel = np.asarray(params["projection"]["kernel"], np.float64)
    qh = _hidden(cfg, params, q) @ kernel
    ch = (_hidden(cfg, params, c.reshape(-1, c.shape[-1])) @ kernel).reshape(c.shape + (16,))
    want = np.zeros(got.shape)
    for b in range(q.shape[0]):
        qr = q[b] != 0
        for i in range(c.shape[1]):
            cr = c[b, i] != 0
            if not cr.any():
                continue
            if head == "dual_encoder":
                e_q, e_c = qh[b][qr].mean(0), ch[b, i][cr].mean(0)
                want[b, i] = e_q @ e_c / np.linalg.norm(e_q) / np.linalg.norm(e_c)
            else:
                qv = qh[b][qr] / np.linalg.norm(qh[b][qr], axis=-1, keepdims=True)
                cv = ch[b, i][cr] / np.linalg.norm(ch[b, i][cr], axis=-1, keepdims=True)
                want[b, i] = (qv @ cv.T).max(axis=1).sum()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert got[1, -1] == 0.0  # the empty candidate slot
    if head == "dual_encoder":
        assert np.all(np.abs(got) <= 1 + 1e-5)


@pytest.mark.parametrize("backbone", ["t5", "bert"])
@pytest.mark.parametrize("head", ["late_interaction", "dual_encoder"])
def test_trains_with_the_shared_trainer_and_kl_loss(tmp_path, backbone, head):
    # One fixed batch of 8 queries, repeated: the KL to the (standardised) labels must fall.
    model = reranker.RerankerModel(BACKBONES[backbone], proj_dim=16, head=head, tau1=1.0,
                                   tau2=0.1 if head == "dual_encoder" else 1.0)
    batch = _batch(seed=3)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    data = data_iterator.InMemoryBatchIterator(rows, batch_size=8, seed=0)
    state = trainer.train(model_dir=tmp_path, model=model, train_data=data, train_steps=12, log_period=1,
                          save_period=12, mesh_config=partitioning.MeshConfig(data=8, model=1),
                          optimizer=optimizers.adamw(3e-3), async_checkpointing=False)
    assert int(state.step) == 12
    _, loss = metrics.read_scalars(tmp_path / "train")["loss"]
    print(backbone, head, "loss first/last:", float(loss[0]), float(loss[-1]))
    assert loss[-1] < 0.7 * loss[0]
    # The trained params score exactly as the loss saw them.
    params = jax.device_get(state.params)
    want, _ = model.loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    assert float(want) < float(loss[0])


def _np_standardize(y, m):
    y = y.astype(np.float64)
    out = np.zeros_like(y)
    for r in range(len(y)):
        real = y[r][m[r] > 0]
        std = real.std()
        out[r][m[r] > 0] = (real - real.mean()) / std if std > 1e-6 else 0.0
    return out


def test_standardized_labels_give_a_non_degenerate_target():
    # BM25-like scores: one strong match, then a spread of weaker ones (the StrategyQA pattern
    # whose raw softmax at tau1 = 1 is nearly one-hot); row 2 has equal labels and a padded slot.
    labels = np.array([[31.0, 18.5, 17.2, 15.9, 14.0, 12.3, 11.1, 9.8],
                       [8.0, 6.5, 2.0, 1.0, 0.5, 0.2, 0.1, 0.0],
                       [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 99.0]], np.float32)
    mask = np.ones_like(labels, np.int32)
    mask[2, -1] = 0
    raw = np.asarray(reranker.target_distribution(jnp.asarray(labels), jnp.asarray(mask), 1.0, "none"))
    std = np.asarray(reranker.target_distribution(jnp.asarray(labels), jnp.asarray(mask), 1.0, "standardize"))
    assert raw[0].max() > 0.99  # degenerate: only the arg-max is taught
    z = _np_standardize(labels, mask)
    for r in range(3):
        real = mask[r] > 0
        p = np.exp(z[r][real] - z[r][real].max())
        np.testing.assert_allclose(std[r][real], p / p.sum(), rtol=1e-5)
        assert std[r][~real].sum() == 0.0
    top = std.max(axis=1)
    assert 0.2 < top[0] < 0.7 and 0.2 < top[1] < 0.7  # spread over several candidates ...
    assert np.all(np.argsort(-std[0]) == np.argsort(-labels[0]))  # ... in the labels' order
    entropy = -(std[0] * np.log(std[0])).sum()
    assert entropy > 1.0 > -(raw[0] * np.log(np.maximum(raw[0], 1e-30))).sum()
    np.testing.assert_allclose(std[2][:7], 1 / 7, rtol=1e-6)  # equal labels: uniform over real slots
    # Invariant to each question's score scale and offset (BM25 magnitudes differ per query).
    shifted = np.asarray(reranker.target_distribution(jnp.asarray(labels * 3 + 7), jnp.asarray(mask), 1.0,
                                                      "standardize"))
    np.testing.assert_allclose(shifted, std, rtol=1e-5, atol=1e-7)

    # The loss uses exactly this target: KL(p_std || softmax(scores / tau2)).
    model = reranker.RerankerModel(T5_CFG, proj_dim=8, tau1=1.0, tau2=0.5)
    assert model.label_normalization == "standardize"
    scores = np.random.default_rng(0).normal(size=labels.shape).astype(np.float32)
    stats = reranker.RankingStats(jnp.asarray(scores), jnp.asarray(labels), jnp.asarray(mask), 1.0, 0.5, "standardize")
    for r in range(3):
        real = mask[r] > 0
        logq = scores[r][real] / 0.5
        logq = logq - np.log(np.exp(logq - logq.max()).sum()) - logq.max()
        p = std[r][real]
        np.testing.assert_allclose(float(stats.kl[r]), float((p * (np.log(p) - logq)).sum()), rtol=1e-4)
    for bad in (dict(label_normalization="zscore"), dict(head="cross"), dict(proj_dim=-1)):
        with pytest.raises(ValueError):
            reranker.RerankerModel(T5_CFG, **bad)


def test_bert_backbone_initialises_from_minilm():
    cfg = hf_bert_io.read_hf_config(hf_bert_io.minilm_dir(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = reranker.RerankerModel(cfg, proj_dim=0, head="dual_encoder")
    params = reranker.hf_encoder_initializer(str(hf_bert_io.minilm_dir()), model=model)()
    assert set(params) == {"encoder"}  # proj_dim 0: the sentence encoder's own space
    _, want = hf_bert_io.load_hf_params(hf_bert_io.minilm_dir(), with_pooler=False)
    np.testing.assert_array_equal(params["encoder"]["layers_3"]["attention"]["query"]["kernel"],
                                  want["layers_3"]["attention"]["query"]["kernel"])
    tok = hf_bert_io.load_tokenizer(hf_bert_io.minilm_dir())
    q = tok.batch_encode(["Do camels store water in their humps?"], 24)
    c = tok.batch_encode(["Camels store fat, not water, in their humps.", "Penguins cannot fly."], 24)[None]
    scores = np.asarray(reranker.score_candidates(model, params, q, c))[0]
    assert scores[0] > scores[1] + 0.2  # pretrained semantics before any training


def test_seqio_vocabulary_of_a_bert_directory_matches_its_tokenizer():
    tf = pytest.importorskip("tensorflow")
    from kard_jax.tasks import vocab as vocab_lib

    path = hf_bert_io.minilm_dir()
    vocab = vocab_lib.load_vocabulary(path)  # a HF directory: WordPiece, not SentencePiece
    assert isinstance(vocab, vocab_lib.HFTokenizerVocabulary) and vocab.eos_id == 102 and vocab.pad_id == 0
    texts = ["Is a camel able to survive without water?", "Café société — naïve résumé, 1,234.5 km²!", ""]
    tok = hf_bert_io.load_tokenizer(path)
    for text in texts:
        want = tok.encode(text)[:-1]  # [CLS] pieces; seqio appends EOS = [SEP]
        assert vocab.encode(text) == want
        assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == want
    ragged = vocab.encode_tf(tf.constant(texts))  # [n] strings -> [n, None] (reranker candidates)
    assert ragged.to_list() == [tok.encode(t)[:-1] for t in texts]
    ds = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)  # inside tf.data (graph mode)
    assert [x.tolist() for x in ds.as_numpy_iterator()] == [tok.encode(t)[:-1] for t in texts]
    assert vocab.decode(vocab.encode(texts[0])) == texts[0].lower()
