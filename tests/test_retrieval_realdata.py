"""Real data: StrategyQA train + teacher rationales + the StrategyQA Wikipedia paragraphs."""
import numpy as np
import pytest

from kard_jax.data.readers import read_examples
from kard_jax.knowledge import retrieval_cache as rc, run
from kard_jax.teacher import filtering, store as teacher_store


@pytest.mark.timeout(300)
def test_strategyqa_rationale_vs_question_retrieval(shared_data, tmp_path, capsys):
    kb_dir = tmp_path / "kb"
    run.build_kb(corpus_paths=[str(shared_data / "kb" / "wikipedia_paragraphs_strategyqa.jsonl.gz")],
                 kb_dir=str(kb_dir), skip_empty_text=True, show_progress=False)
    store, index = run.load_kb(kb_dir)
    assert store.manifest["num_empty_skipped"] == 2 and len(store) > 11_000

    examples = read_examples(shared_data / "strategyqa" / "train.jsonl", dataset="strategyqa")
    raw = teacher_store.read_rationales(shared_data / "strategyqa" / "rationales.train.jsonl.gz")
    kept, _ = filtering.filter_all(examples, raw)
    config = rc.RetrievalConfig(rationale_top_k=5, question_top_k=20)
    manifest = rc.build_retrieval_cache(examples, tmp_path / "cache", store=store, bm25=index, rationales=kept,
                                        config=config, show_progress=False)
    r_rows = rc.read_rationale_retrieval(tmp_path / "cache")
    q_rows = {q["question_id"]: q for q in rc.read_question_candidates(tmp_path / "cache")}
    assert len(q_rows) == len(examples) == 1603
    assert len(r_rows) == manifest["counts"]["rationales"] == sum(len(v) for v in kept.values()) > 10_000

    differs = 0
    for row in r_rows:
        assert len(row["passage_ids"]) == 5 and row["scores"] == sorted(row["scores"], reverse=True)
        q_top1 = q_rows[row["question_id"]]["candidate_ids"][0]
        r_top1 = row["passage_ids"][0]
        differs += q_top1 != r_top1
        # Labels (candidate scoring) agree with search: the rationale's top-1 is among the candidates
        # (union flag) and is the argmax of the BM25 scores against the rationale.
        cands = q_rows[row["question_id"]]["candidate_ids"]
        label = q_rows[row["question_id"]]["labels"][str(row["rationale_index"])]
        assert np.isclose(label[cands.index(r_top1)], row["scores"][0], rtol=1e-5)
        assert np.isclose(max(label), row["scores"][0], rtol=1e-5) and label[0] <= row["scores"][0] * (1 + 1e-6)
    rate = differs / len(r_rows)
    with capsys.disabled():
        print(f"\nStrategyQA train: {len(r_rows)} kept rationales; rationale-retrieved top-1 passage differs "
              f"from the question-retrieved top-1 for {differs} ({rate:.1%})")
    assert 0.0 < rate < 1.0
