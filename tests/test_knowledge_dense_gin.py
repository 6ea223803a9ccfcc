"""Dense retrieval through the run gins: build_kb embeds passages with a local HF T5 encoder
(EMBEDDER), retrieve embeds questions with it; candidates equal a numpy brute force."""
import json
import subprocess
import sys

import jax
import numpy as np
import sentencepiece as spm
from flax.core import meta

from kard_jax import hf_io
from kard_jax.knowledge import embed, run
from kard_jax.knowledge import retrieval_cache as rc
from kard_jax.models import t5
from tests.test_retrieval_cache import EXAMPLES, KB_ROWS, REPO


def _main(*args):
    proc = subprocess.run([sys.executable, "-m", "kard_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_dense_kb_and_dense_question_retrieval_via_gin(tmp_path):
    # A tiny random T5 with its own SentencePiece model, exported as a Hugging Face directory.
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"{r['title']} {r['text']}" for r in KB_ROWS for _ in range(3)) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "spiece"), vocab_size=80,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    cfg = t5.preset_config("tiny", vocab_size=192, d_model=32, d_kv=8, d_ff=64)
    tokens = np.ones((1, 4), np.int32)
    params = meta.unbox(t5.T5(cfg).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
    hf_io.export_hf(params, cfg, tmp_path / "hf", spiece_model=tmp_path / "spiece.model")

    corpus = tmp_path / "kb.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in KB_ROWS))
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"id": e.id, "sent1": e.question, "sent2": "", "ending0": "yes",
                                            "ending1": "no", "label": e.answer}) + "\n" for e in EXAMPLES))
    embedder_flags = ["--gin.EMBEDDER=@kard_jax.knowledge.embed.embedder_from_hf()",
                      f"--gin.EMBED_HF_DIR='{tmp_path / 'hf'}'", "--gin.EMBED_MAX_LENGTH=32"]
    _main("--gin_file=gin_configs/runs/build_kb.gin", f"--gin.CORPUS_PATHS=['{corpus}']",
          f"--gin.KB_PATH='{tmp_path / 'kb'}'", *embedder_flags)
    _main("--gin_file=gin_configs/runs/retrieve.gin", f"--gin.EXAMPLES_PATH='{examples}'",
          f"--gin.KB_PATH='{tmp_path / 'kb'}'", f"--gin.OUTPUT_DIR='{tmp_path / 'cache'}'",
          "--gin.QUESTION_RETRIEVER='dense'", "--gin.QUESTION_TOP_K=3", *embedder_flags)

    # Brute force in numpy from the same encoder: passage contents and the cache's query text.
    embedder = embed.embedder_from_hf(tmp_path / "hf", max_length=32, batch_size=8)
    store, _ = run.load_kb(tmp_path / "kb")
    passages = embedder.embed([store.contents(i) for i in range(len(store))])
    np.testing.assert_allclose(passages, embed.load_embeddings(tmp_path / "kb" / "embeddings"), atol=1e-5)
    config = rc.RetrievalConfig()
    rows = rc.read_question_candidates(tmp_path / "cache")
    for ex, row in zip(EXAMPLES, rows):
        query = embedder.embed([rc._query_text(ex, config)])[0]
        expected = np.argsort(-(passages @ query), kind="stable")[:3]
        assert row["candidate_ids"] == store.ids_of(expected)
        np.testing.assert_allclose(row["question_scores"], (passages @ query)[expected], rtol=1e-4, atol=1e-5)
