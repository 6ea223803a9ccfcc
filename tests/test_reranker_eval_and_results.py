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
