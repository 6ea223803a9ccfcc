"""Cross-validation folds of the reranker: held-out ranges partition the questions, the reranker
task's splits follow them, and pooling the folds' evaluations gives exactly the metrics of one
evaluation over every question (BM25 is fold-independent, so it is the reference)."""
import json

import pytest

from kard_jax.data.splits import is_held_out
from kard_jax.errors import InputError
from kard_jax.inference import reranker_eval


def test_folds_partition_the_questions():
    ids = [f"q{i}" for i in range(2000)]
    k = 5
    folds = [[q for q in ids if is_held_out(q, 1 / k, j / k)] for j in range(k)]
    assert sorted(q for fold in folds for q in fold) == sorted(ids)  # each question in exactly one fold
    assert all(250 < len(fold) < 550 for fold in folds)
    assert [q for q in ids if is_held_out(q, 0.3)] == [q for q in ids if is_held_out(q, 0.3, 0.0)]
    with pytest.raises(ValueError, match="start"):
        is_held_out("q1", 0.5, 0.6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.demo_worlds import world_with_rationales
    from kard_jax.knowledge import run as knowledge

    root = tmp_path_factory.mktemp("folds")
    world_dir = world_with_rationales(root, train_entities=8, test_entities=2, seed=5, answer_line=False)
    knowledge.build_kb(corpus_paths=[str(world_dir / "kb.jsonl")], kb_dir=str(root / "kb"), show_progress=False)
    return root, world_dir


def _evaluate(root, world_dir, out, **kwargs):
    return reranker_eval.eval_reranker(examples_path=str(world_dir / "train.jsonl"),
                                       rationales_path=str(root / "teacher"), kb_dir=str(root / "kb"),
                                       out_dir=str(root / out), n_candidates=5, dataset="demo", **kwargs)


def test_pooled_folds_equal_one_evaluation_of_every_question(world):
    root, world_dir = world
    whole = _evaluate(root, world_dir, "whole")
    dirs = [str(root / f"fold{j}") for j in range(3)]
    for j, directory in enumerate(dirs):
        _evaluate(root, world_dir, directory, holdout_fraction=1 / 3, holdout_start=j / 3)
    rows = [json.loads(line) for d in dirs for line in open(f"{d}/{reranker_eval.FIRST_RANKS_FILE}")]
    assert len({r["question_id"] for r in rows}) == len(rows) == whole["rankings"]["bm25"]["num_questions"] > 10
    pooled = reranker_eval.pool_evaluations(eval_dirs=dirs, out_dir=str(root / "pooled"))
    assert pooled["rankings"]["bm25"] == whole["rankings"]["bm25"]
    assert sum(pooled["questions_per_fold"].values()) == len(rows)
    assert pooled["rankings"]["random order"]["vs_bm25"]["hits@1"]["wins"] >= 0
    assert json.loads((root / "pooled" / "metrics.json").read_text())["rankings"]["bm25"] == whole["rankings"]["bm25"]
    assert "| bm25 |" in (root / "pooled" / "results.md").read_text()

    with pytest.raises(InputError, match="folds overlap") as overlap:
        reranker_eval.pool_evaluations(eval_dirs=[dirs[0], dirs[0]], out_dir=str(root / "bad"))
    assert f"{reranker_eval.FIRST_RANKS_FILE}, line 1" in str(overlap.value)
    _evaluate(root, world_dir, "other", holdout_fraction=1 / 3, holdout_start=0.0, silver_top_k=2)
    with pytest.raises(InputError, match="top-2 .* but .*top-1 .*same setup"):
        reranker_eval.pool_evaluations(eval_dirs=[dirs[1], str(root / "other")], out_dir=str(root / "bad"))
    assert not (root / "bad").exists()  # nothing half-written


def test_reranker_task_validation_split_is_the_fold(world, tmp_path):
    seqio = pytest.importorskip("seqio")
    from kard_jax.knowledge import retrieval_cache, run as knowledge
    from kard_jax.tasks import registry, vocab

    root, world_dir = world
    knowledge.retrieve(examples_path=str(world_dir / "train.jsonl"), kb_dir=str(root / "kb"),
                       output_dir=str(tmp_path / "retrieval"), rationales_path=str(root / "teacher"), dataset="demo",
                       config=retrieval_cache.RetrievalConfig(rationale_top_k=2, question_top_k=4),
                       show_progress=False)
    vocab_dir = vocab.train_sentencepiece(output_dir=str(tmp_path / "vocab"), corpus_paths=[str(world_dir / "kb.jsonl")],
                                          dataset_paths=[str(world_dir / "train.jsonl")], vocab_size=150,
                                          hard_vocab_limit=False, show_progress=False)
    seen = {}
    for j in range(2):
        registry.register_kard_tasks("fold", train_path=str(world_dir / "train.jsonl"), vocab_path=str(vocab_dir),
                                     rationales_path=str(root / "teacher"), retrieval_cache_dir=str(tmp_path / "retrieval"),
                                     kb_dir=str(root / "kb"), prompt_template="science", reranker_holdout_fraction=0.5,
                                     reranker_holdout_start=j * 0.5)
        task = seqio.get_mixture_or_task("kard_fold_reranker")
        for split in ("train", "validation"):
            seen[j, split] = {r["question_id"].decode()
                              for r in task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator()}
    assert seen[0, "validation"] == seen[1, "train"] and seen[1, "validation"] == seen[0, "train"]
    assert seen[0, "validation"] and seen[1, "validation"]
    assert all(is_held_out(q, 0.5, 0.5) for q in seen[1, "validation"])
