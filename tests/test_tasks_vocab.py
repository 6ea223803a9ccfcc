"""Vocabulary: T5 conventions of the trained SentencePiece model, seqio loading with 100
sentinels, atomic output, and the build_vocab / materialize gin files."""
from __future__ import annotations

import json

import pytest

seqio = pytest.importorskip("seqio")

import gin  # noqa: E402
import sentencepiece as spm  # noqa: E402

from kard_jax import gin_utils  # noqa: E402
from kard_jax.errors import InputError  # noqa: E402
from kard_jax.tasks import vocab as vocab_lib  # noqa: E402

WORDS = ("water plant sun light heat energy rock soil cloud rain river animal food grow magnet iron metal "
         "glass wood ice melt boil freeze gravity force push pull").split()


@pytest.fixture()
def corpus(tmp_path):
    import random

    rng = random.Random(0)
    path = tmp_path / "kb.jsonl"
    with open(path, "w") as f:
        for i in range(300):
            text = " ".join(rng.choice(WORDS) for _ in range(15)) + "."
            f.write(json.dumps({"id": f"doc{i}", "title": rng.choice(WORDS).title(), "text": text}) + "\n")
    return path


def test_trained_vocabulary_follows_t5_conventions(corpus, tmp_path):
    out = vocab_lib.train_sentencepiece(output_dir=str(tmp_path / "v"), corpus_paths=[str(corpus)], vocab_size=150,
                                        hard_vocab_limit=False, show_progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == sp.get_piece_size() and manifest["sentences_used"] > 300
    assert not any(p.name.startswith(".v.tmp") for p in tmp_path.iterdir())  # temp dir moved into place

    vocab = vocab_lib.load_vocabulary(out)
    assert vocab.vocab_size == sp.get_piece_size() + 100
    text = "The sun heats water. Answer: B"
    assert vocab.encode(text) == sp.encode(text)
    assert vocab.decode(vocab.encode(text)) == text
    # seqio numbers the sentinels downwards from the top: <extra_id_0> is the last id.
    assert vocab.encode("<extra_id_0>") == [vocab.vocab_size - 1]
    assert vocab_lib.token_counter(vocab)(text) == len(sp.encode(text))


def test_loading_a_hugging_face_style_directory_and_a_model_file(corpus, tmp_path):
    out = vocab_lib.train_sentencepiece(output_dir=str(tmp_path / "hf"), corpus_paths=[str(corpus)],
                                        vocab_size=150, hard_vocab_limit=False, show_progress=False)
    (out / "config.json").write_text("{}")
    a = vocab_lib.load_vocabulary(out)
    b = vocab_lib.load_vocabulary(out / "spiece.model")
    assert a.encode("rock and soil") == b.encode("rock and soil")


def test_bad_vocabulary_inputs(corpus, tmp_path):
    with pytest.raises(InputError, match="vocabulary training file not found"):
        vocab_lib.train_sentencepiece(output_dir=str(tmp_path / "v"), corpus_paths=[str(tmp_path / "missing.jsonl")],
                                      vocab_size=100, show_progress=False)
    assert not (tmp_path / "v").exists()
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a SentencePiece model"):
        vocab_lib.load_vocabulary(tmp_path / "junk.model")


def test_build_vocab_gin_runs_and_materialize_gin_parses(corpus, tmp_path):
    import kard_jax.main as main

    gin.clear_config()
    try:
        gin_utils.parse(["runs/build_vocab.gin"], [f"VOCAB_DIR = '{tmp_path / 'gv'}'", f"CORPUS_PATHS = ['{corpus}']",
                                                   "VOCAB_SIZE = 120", "vocab.train_sentencepiece.hard_vocab_limit = False"])
        gin.get_configurable(main.execute)()
        assert vocab_lib.load_vocabulary(tmp_path / "gv").vocab_size > 100
        gin.clear_config()
        gin_utils.parse(["runs/materialize.gin"], ["DATASET = 'obqa'", "TASK = 'kard_obqa_ft'", "OUT_DIR = '/tmp/x'",
                                                   "TRAIN_PATH = 'train.jsonl'", "VOCAB_PATH = '/tmp/v'"])
        assert "run.materialize" in gin.config_str() or "materialize" in gin.config_str()
    finally:
        gin.clear_config()
