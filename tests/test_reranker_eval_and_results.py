"""Reranker evaluation metrics (hand-computed Hits@k / MRR against silver sets), the silver-set
definition on a real BM25 index, and the results table (markdown, JSON, PNG)."""
import json

import pytest

from kard_jax.data.example import Example
from kard_jax.errors import InputError
from kard_jax.inference import passages, reranker_eval, results_table
from kard_jax.knowledge import run as knowledge


def test_ranking_metrics_by_hand():
    rankings = [[5, 2, 9], [1, 3, 4], [7, 8, 6]]
    silver = [{2}, {4, 1}, {0}]
    m = reranker_eval.ranking_metrics(rankings, silver, ks=(1, 2, 3))
    # first silver ranks: 2, 1, none
    assert m["hits@1"] == pytest.approx(1 / 3)
    assert m["hits@2"] == pytest.approx(2 / 3)
    assert m["hits@3"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["num_questions"] == 3


def test_paired_comparison_and_sign_test_by_hand():
    # first silver ranks on 6 questions, of a ranking and of the reference
    first = [1, 2, None, 4, 1, 3]
    ref = [2, 1, 1, None, 1, 9]
    c = reranker_eval.paired_comparison(first, ref, ks=(1, 3))
    # k=1: hits [1,0,0,0,1,0] vs [0,1,1,0,1,0] -> wins {q0}, losses {q1, q2}
    assert (c["hits@1"]["wins"], c["hits@1"]["losses"]) == (1, 2)
    # k=3: hits [1,1,0,0,1,1] vs [1,1,1,0,1,0] -> wins {q5}, losses {q2}
    assert (c["hits@3"]["wins"], c["hits@3"]["losses"]) == (1, 1)
    # exact two-sided sign test: n=3, min=1 -> 2 * (C(3,0) + C(3,1)) / 8 = 1.0; n=10, 1 -> 2 * 11 / 1024
    assert c["hits@1"]["p_value"] == 1.0
    assert reranker_eval.sign_test_p(9, 1) == pytest.approx(22 / 1024)
    assert reranker_eval.sign_test_p(0, 0) == 1.0
    assert reranker_eval.sign_test_p(5, 5) == 1.0
    # Past 1,023 discordant pairs (2**n overflows a float): symmetric splits stay 1, lopsided ones
    # underflow to 0, and a moderate one matches the normal approximation's order of magnitude.
    assert reranker_eval.sign_test_p(1000, 1000) == 1.0
    assert reranker_eval.sign_test_p(10, 1990) == 0.0
    assert 1e-4 < reranker_eval.sign_test_p(1060, 940) < 1e-2  # z = 2.68 -> p ~ 0.0074
    with pytest.raises(ValueError):
        reranker_eval.paired_comparison([1], [1, 2])


def test_evaluate_rankers_pairs_each_ranking_with_the_reference():
    examples = [Example(f"q{i}", f"question {i}", ("a", "b"), 0, "demo") for i in range(4)]
    silver = {"q0": {1}, "q1": {2}, "q2": {3}, "q3": {9}}  # q3's silver is in no ranking
    ref_rows = {"q0": [1, 5], "q1": [5, 2], "q2": [5, 6], "q3": [5, 6]}
    new_rows = {"q0": [5, 1], "q1": [2, 5], "q2": [3, 5], "q3": [6, 5]}
    results = reranker_eval.evaluate_rankers(
        examples, {"bm25": lambda exs: [ref_rows[e.id] for e in exs], "new": lambda exs: [new_rows[e.id] for e in exs]},
        silver, ks=(1, 2), reference="bm25")
    assert "vs_bm25" not in results["bm25"]
    assert results["new"]["vs_bm25"]["hits@1"] == {"wins": 2, "losses": 1, "p_value": 1.0}
    assert results["new"]["vs_bm25"]["hits@2"] == {"wins": 1, "losses": 0, "p_value": 1.0}
    assert results["new"]["hits@1"] - results["bm25"]["hits@1"] == pytest.approx((2 - 1) / 4)
    table = reranker_eval.format_table(results, ks=(1, 2))
    assert "| new | bm25 | +2 / -1, p=1.000 | +1 / -0, p=1.000 |" in table


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("rkb")
    rows = [
        {"id": "a", "title": "Zorbla habitat", "text": "The zorbla makes its home in the tundra."},
        {"id": "b", "title": "Zorbla sightings", "text": "The zorbla is most likely to be found by observers."},
        {"id": "c", "title": "Kinmar habitat", "text": "The kinmar makes its home in the desert."},
        {"id": "d", "title": "Kinmar sightings", "text": "The kinmar is most likely to be found by observers."},
    ]
    (root / "kb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    knowledge.build_kb(corpus_paths=[str(root / "kb.jsonl")], kb_dir=str(root / "kb"), show_progress=False)
    return passages.KnowledgeBase(root / "kb")


def test_silver_sets_and_rankers_against_them(kb):
    examples = [Example("q1", "Where is the zorbla most likely to be found?", ("tundra", "desert"), 0, "demo"),
                Example("q2", "Where is the kinmar most likely to be found?", ("tundra", "desert"), 1, "demo")]
    rationales = {"q1": ["The zorbla makes its home in the tundra. So the answer is (A) tundra."],
                  "q2": ["", "The kinmar makes its home in the desert. So the answer is (B) desert."]}
    silver = reranker_eval.silver_sets(kb, rationales, ["q1", "q2"])
    ids = {qid: set(kb.ids(sorted(s))) for qid, s in silver.items()}
    assert ids == {"q1": {"a"}, "q2": {"c"}}
    pos = {pid: i for i, pid in enumerate(kb.ids(range(4)))}
    fixed = {"q1": [pos["b"], pos["a"]], "q2": [pos["c"], pos["d"]]}  # distractor first for q1
    results = reranker_eval.evaluate_rankers(examples, {"fixed": lambda exs: [fixed[e.id] for e in exs]}, silver,
                                             ks=(1, 2))
    assert results["fixed"]["hits@1"] == 0.5 and results["fixed"]["hits@2"] == 1.0
    assert results["fixed"]["mrr"] == pytest.approx((0.5 + 1.0) / 2)
    bm25 = passages.bm25_ranker(kb, 4, "question")
    with pytest.raises(InputError, match="silver"):
        reranker_eval.evaluate_rankers(examples, {"bm25": bm25}, {"q1": set(), "q2": set()})


def _metrics(directory, method, dataset, accuracy, seeds=(0,), std=0.0):
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps({
        "method": method, "dataset": dataset, "accuracy": accuracy, "accuracy_std": std, "seeds": list(seeds),
        "num_examples": 10, "source": "none"}))
    return str(directory)


def test_results_table_layout_and_chart(tmp_path):
    runs = [_metrics(tmp_path / "a", "kard_bm25", "obqa", 0.5), _metrics(tmp_path / "b", "ft", "obqa", 0.25),
            _metrics(tmp_path / "c", "ft", "strategyqa", 0.55, seeds=(0, 1), std=0.02)]
    text = results_table.results_table(runs=runs, out_dir=str(tmp_path / "out"), title="t")
    lines = text.splitlines()
    assert lines[0] == "| method | obqa | strategyqa |"
    assert lines[2].startswith("| FT") and "25.0" in lines[2] and "55.0 ± 2.0" in lines[2]  # paper's row order
    assert lines[3].startswith("| KARD, BM25") and lines[3].endswith("| 50.0 | – |")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["ft"]["strategyqa"]["accuracy"] == 0.55
    png = (tmp_path / "out" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    with pytest.raises(InputError, match="two runs"):
        results_table.gather(runs + [_metrics(tmp_path / "d", "ft", "obqa", 0.3)])
