"""Retrieval cache stage: expected passages, candidate union + labels, no-op rerun, bad input via main."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kard_jax.data.example import Example
from kard_jax.errors import InputError
from kard_jax.knowledge import bm25, retrieval_cache as rc, run

REPO = pathlib.Path(__file__).resolve().parents[1]
KB_ROWS = [
    {"id": "volcano", "title": "Volcano", "text": "A volcano erupts lava and ash from the magma chamber."},
    {"id": "penguin", "title": "Penguin", "text": "Penguins are flightless birds living in Antarctica."},
    {"id": "piano", "title": "Piano", "text": "The piano has eighty eight keys and hammers striking strings."},
    {"id": "moon", "title": "Moon", "text": "The Moon orbits Earth and causes ocean tides."},
    {"id": "coffee", "title": "Coffee", "text": "Coffee contains caffeine, a stimulant of the nervous system."},
    {"id": "birds", "title": "Bird", "text": "Most birds can fly; wings and feathers help flight."},
]
EXAMPLES = [
    Example("q1", "Are penguins good swimmers?", ("yes", "no"), 0),
    Example("q2", "Does the Moon affect the sea?", ("yes", "no"), 0),
    Example("q3", "Is a piano a string instrument?", ("yes", "no"), 0),
]
RATIONALES = {
    "q1": ["Penguins are flightless birds of Antarctica, so (B) no.", "  ", "Birds usually fly with wings and feathers."],
    "q2": ["Ocean tides are caused by the Moon orbiting Earth. (A) yes."],
    "unknown": ["ignored: no such question"],
}


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("kb")
    src = root / "kb.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in KB_ROWS), encoding="utf-8")
    run.build_kb(corpus_paths=[str(src)], kb_dir=str(root / "kb"), show_progress=False)
    return root / "kb"


def _ids(rows, key="passage_ids"):
    return [r[key] for r in rows]


def test_expected_passages_labels_and_noop(kb, tmp_path, capsys):
    store, index = run.load_kb(kb)
    config = rc.RetrievalConfig(rationale_top_k=2, question_top_k=2, rows_per_shard=2)
    out = tmp_path / "cache"
    manifest = rc.build_retrieval_cache(EXAMPLES, out, store=store, bm25=index, rationales=RATIONALES,
                                        config=config, show_progress=False)
    assert manifest["counts"] == {"questions": 3, "rationales": 3, "questions_without_rationales": 1, "passages": 6}
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "question_candidates-00000-of-00002.jsonl", "question_candidates-00001-of-00002.jsonl",
        "rationale_retrieval-00000-of-00002.jsonl", "rationale_retrieval-00001-of-00002.jsonl"]
    r_rows = rc.read_rationale_retrieval(out)
    assert [(r["question_id"], r["rationale_index"]) for r in r_rows] == [("q1", 0), ("q1", 2), ("q2", 0)]
    assert [r["passage_ids"][0] for r in r_rows] == ["penguin", "birds", "moon"]
    for r in r_rows:  # scores are BM25 scores of the listed passages with the rationale as query
        np.testing.assert_allclose(r["scores"], index.score_candidates(r["rationale"], store.indices_of(r["passage_ids"])),
                                   rtol=1e-6)
    q_rows = rc.read_question_candidates(out)
    assert [q["question_id"] for q in q_rows] == ["q1", "q2", "q3"]
    q1 = q_rows[0]
    top_q, _ = index.search([EXAMPLES[0].question], k=2)
    assert q1["candidate_ids"][:2] == store.ids_of(top_q[0])
    rationale_ids = {p for r in r_rows[:2] for p in r["passage_ids"]}
    assert set(q1["candidate_ids"]) == set(store.ids_of(top_q[0])) | rationale_ids  # union flag
    assert len(q1["candidate_ids"]) == len(set(q1["candidate_ids"]))
    cand_idx = store.indices_of(q1["candidate_ids"])
    np.testing.assert_allclose(q1["question_scores"], index.score_candidates(EXAMPLES[0].question, cand_idx), rtol=1e-6)
    assert sorted(q1["labels"]) == ["0", "2"]
    for ri, label in q1["labels"].items():
        np.testing.assert_allclose(label, index.score_candidates(RATIONALES["q1"][int(ri)].strip(), cand_idx), rtol=1e-6)
    assert q1["candidate_ids"][int(np.argmax(q1["labels"]["0"]))] == "penguin"
    assert q_rows[2]["labels"] == {} and len(q_rows[2]["candidate_ids"]) == 2  # q3: no rationales
    assert q_rows[2]["candidate_ids"][0] == "piano"

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    again = rc.build_retrieval_cache(EXAMPLES, out, store=store, bm25=index, rationales=RATIONALES, config=config,
                                     show_progress=False)
    assert "up to date" in capsys.readouterr().out
    assert again["config_hash"] == manifest["config_hash"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    no_union = rc.build_retrieval_cache(EXAMPLES, out, store=store, bm25=index, rationales=RATIONALES,
                                        config=rc.RetrievalConfig(rationale_top_k=2, question_top_k=2,
                                                                  union_rationale_candidates=False),
                                        show_progress=False)
    assert no_union["config_hash"] != manifest["config_hash"]
    assert all(len(q["candidate_ids"]) == 2 for q in rc.read_question_candidates(out))


def test_eval_split_has_question_candidates_only(kb, tmp_path):
    store, index = run.load_kb(kb)
    out = tmp_path / "eval"
    manifest = rc.build_retrieval_cache(EXAMPLES, out, store=store, bm25=index, rationales=None,
                                        config=rc.RetrievalConfig(question_top_k=3), show_progress=False)
    assert manifest["split_kind"] == "eval" and rc.read_rationale_retrieval(out) == []
    rows = rc.read_question_candidates(out)
    assert [r["candidate_ids"][0] for r in rows] == ["penguin", "moon", "piano"]
    assert all(r["labels"] == {} and len(r["candidate_ids"]) == 3 for r in rows)


def test_dense_question_retriever(kb, tmp_path):
    """Question candidates from a dense searcher; union extras scored with the passage vectors."""
    from kard_jax.knowledge import scann_index

    store, index = run.load_kb(kb)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(store), 8)).astype(np.float32)
    query_vecs = {ex.question: rng.standard_normal(8).astype(np.float32) for ex in EXAMPLES}
    dense = rc.DenseRetriever(embed_queries=lambda qs: np.stack([query_vecs[q] for q in qs]),
                              searcher=scann_index.BruteForceSearcher(vectors), passage_vectors=vectors,
                              fingerprint="random-test")
    rc.build_retrieval_cache(EXAMPLES, tmp_path / "d", store=store, bm25=index, rationales=RATIONALES, dense=dense,
                             config=rc.RetrievalConfig(rationale_top_k=1, question_top_k=2, question_retriever="dense"),
                             show_progress=False)
    for ex, row in zip(EXAMPLES, rc.read_question_candidates(tmp_path / "d")):
        expected = vectors[store.indices_of(row["candidate_ids"])] @ query_vecs[ex.question]
        np.testing.assert_allclose(row["question_scores"], expected, rtol=1e-5)
        assert row["candidate_ids"][:2] == store.ids_of(np.argsort(-(vectors @ query_vecs[ex.question]))[:2])


def test_bad_inputs_raise_and_write_nothing(kb, tmp_path):
    store, index = run.load_kb(kb)
    out = tmp_path / "cache"
    with pytest.raises(InputError, match="no examples"):
        rc.build_retrieval_cache([], out, store=store, bm25=index, show_progress=False)
    other = bm25.BM25Index.build(["just one passage"], show_progress=False)
    with pytest.raises(InputError, match="BM25 index has 1 passages"):
        rc.build_retrieval_cache(EXAMPLES, out, store=store, bm25=other, show_progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def _main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kard_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_main_build_kb_and_retrieve_errors_exit_nonzero(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "title": "no text"}\n', encoding="utf-8")
    kb_dir = tmp_path / "kb"
    res = _main("--gin_file=gin_configs/runs/build_kb.gin", f"--gin.CORPUS_PATHS=['{bad}']", f"--gin.KB_PATH='{kb_dir}'")
    assert res.returncode != 0
    assert f"{bad}, line 2, field 'text'" in res.stderr
    assert not kb_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in KB_ROWS), encoding="utf-8")
    res = _main("--gin_file=gin_configs/runs/build_kb.gin", f"--gin.CORPUS_PATHS=['{good}']", f"--gin.KB_PATH='{kb_dir}'")
    assert res.returncode == 0, res.stderr
    assert "kard_jax build_kb: 6 passages" in res.stdout
    examples = tmp_path / "train.jsonl"
    examples.write_text(json.dumps({"id": "q1", "sent1": "Can penguins fly?", "sent2": "", "ending0": "yes",
                                    "ending1": "no", "ending2": "", "ending3": "", "label": 1}) + "\n", encoding="utf-8")
    rationales = tmp_path / "rationales.jsonl"
    rationales.write_text('{"id": "q1", "rationales": ["Penguins are flightless."]}\n{"id": "q2", "rationales": 7}\n',
                          encoding="utf-8")
    out = tmp_path / "cache"
    args = ["--gin_file=gin_configs/runs/retrieve.gin", f"--gin.EXAMPLES_PATH='{examples}'",
            f"--gin.KB_PATH='{kb_dir}'", f"--gin.OUTPUT_DIR='{out}'", f"--gin.RATIONALES_PATH='{rationales}'"]
    res = _main(*args)
    assert res.returncode != 0
    assert f"{rationales}, line 2, field 'rationales'" in res.stderr
    assert not out.exists()
    rationales.write_text('{"id": "q1", "rationales": ["Penguins are flightless."]}\n', encoding="utf-8")
    res = _main(*args)
    assert res.returncode == 0, res.stderr
    assert "kard_jax retrieve: 1 questions, 1 rationales (train)" in res.stdout
    assert rc.read_rationale_retrieval(out)[0]["passage_ids"][0] == "penguin"
