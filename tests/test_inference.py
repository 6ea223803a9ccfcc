"""Inference helpers: self-consistency voting, scoring, atomic outputs, the TF-free tokenizer."""
import json

import numpy as np
import pytest
import sentencepiece as spm

from kard_jax.inference import pipeline
from kard_jax.tokenizer import Tokenizer


def test_majority_vote_counts_parsed_answers_and_breaks_ties_by_order():
    assert pipeline.majority_vote([1, None, 2, 1, 2]) == (1, {"B": 2, "C": 2})
    assert pipeline.majority_vote([3, 0, 0]) == (0, {"A": 2, "D": 1})
    assert pipeline.majority_vote([None, None]) == (None, {})


def test_score_and_atomic_write(tmp_path):
    preds = [
        pipeline.Prediction("q1", 0, 0, ("... Answer: A",), {"A": 1}, ()),
        pipeline.Prediction("q2", 1, None, ("nonsense",), {}, ()),
        pipeline.Prediction("q3", 2, 1, ("Answer: B",), {"B": 1}, ("p",)),
    ]
    metrics = pipeline.score(preds)
    assert metrics == {"num_examples": 3, "accuracy": 1 / 3, "num_unparsed": 1, "unparsed_rate": 1 / 3}
    pipeline.write_predictions(tmp_path, preds, metrics)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False]
    assert rows[1]["predicted"] is None and rows[2]["predicted"] == "B" and rows[2]["gold"] == "C"
    assert json.loads((tmp_path / "metrics.json").read_text())["num_examples"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    words = "the creature lives in desert tundra eats moss answer explanation question knowledge".split()
    rng = np.random.default_rng(0)
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=32, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return d / "spiece.model"


def test_tokenizer_matches_seqio_ids_and_pads_with_eos(spiece):
    import seqio

    tok = Tokenizer(spiece)
    vocab = seqio.SentencePieceVocabulary(str(spiece), extra_ids=100)
    text = "the creature lives in the desert"
    assert tok.encode(text) == list(vocab.encode(text))
    batch = tok.batch_encode([text, "moss"], 6)
    ids = tok.encode(text)
    assert batch.shape == (2, 6) and list(batch[0]) == ids[:5] + [1]
    assert batch[1].tolist()[: len(tok.encode("moss")) + 1] == tok.encode("moss") + [1]
    assert tok.decode(tok.encode(text) + [1, 7, 8]) == text
    assert tok.decode([tok.base_vocab_size + 3] + tok.encode("moss")) == "moss"  # sentinels dropped
