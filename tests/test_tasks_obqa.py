"""Real data: the `kard` task on OBQA over kb/wikipedia_summaries (BM25 retrieval by
kard_jax.knowledge) yields one example per kept rationale; materialized shards read by 4 hosts
cover every example exactly once. A subset of questions keeps the runtime short."""
from __future__ import annotations

import collections
import itertools
import json
import time

import pytest

seqio = pytest.importorskip("seqio")

from kard_jax.data.readers import read_examples  # noqa: E402
from kard_jax.knowledge.bm25 import BM25Index  # noqa: E402
from kard_jax.knowledge.passage_store import build_passage_store  # noqa: E402
from kard_jax.knowledge.retrieval_cache import RetrievalConfig, build_retrieval_cache  # noqa: E402
from kard_jax.tasks import cache, registry, run, vocab as vocab_lib  # noqa: E402
from kard_jax.teacher.filtering import filter_all  # noqa: E402
from kard_jax.teacher.importers import import_jsonl  # noqa: E402
from kard_jax.teacher.store import write_rationales  # noqa: E402

NUM_TRAIN, NUM_DEV, N_PASSAGES = 40, 40, 3


def test_obqa_kard_task_on_wikipedia_summaries(shared_data, tmp_path):
    t0 = time.time()
    obqa, kb_file = shared_data / "obqa", shared_data / "kb" / "wikipedia_summaries.jsonl.gz"
    train = read_examples(obqa / "train.jsonl", dataset="obqa")[:NUM_TRAIN]
    dev = read_examples(obqa / "dev.jsonl", dataset="obqa")[:NUM_DEV]
    for name, rows in (("train.jsonl", train), ("dev.jsonl", dev)):
        with open(obqa / name) as src, open(tmp_path / name, "w") as dst:
            dst.writelines(itertools.islice(src, len(rows)))
    raw, _ = import_jsonl(obqa / "rationales.train.jsonl.gz")
    kept, report = filter_all(train, raw)
    write_rationales(tmp_path / "teacher", kept, {"teacher": "shared obqa"})

    store = build_passage_store([kb_file], tmp_path / "kb", show_progress=False)
    bm25 = BM25Index.build((store.contents(i) for i in range(len(store))), show_progress=False)
    config = RetrievalConfig(rationale_top_k=N_PASSAGES, question_top_k=10)
    build_retrieval_cache(train, tmp_path / "ret_train", store=store, bm25=bm25, rationales=kept, config=config,
                          show_progress=False)
    build_retrieval_cache(dev, tmp_path / "ret_dev", store=store, bm25=bm25, config=config, show_progress=False)
    texts = [json.dumps({"text": store.contents(i)}) for i in range(0, len(store), 8)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(texts) + "\n")
    vocab_lib.train_sentencepiece(output_dir=str(tmp_path / "vocab"), corpus_paths=[str(tmp_path / "corpus.jsonl")],
                                  dataset_paths=[str(tmp_path / "train.jsonl")], vocab_size=1000,
                                  hard_vocab_limit=False, show_progress=False)
    setup_s = time.time() - t0

    names = registry.register_kard_tasks(
        "obqa", train_path=str(tmp_path / "train.jsonl"), vocab_path=str(tmp_path / "vocab"),
        rationales_path=str(tmp_path / "teacher"), retrieval_cache_dir=str(tmp_path / "ret_train"),
        kb_dir=str(tmp_path / "kb"), n_passages=N_PASSAGES, input_length=512, target_length=256,
        eval_paths={"validation": str(tmp_path / "dev.jsonl")},
        eval_retrieval_cache_dirs={"validation": str(tmp_path / "ret_dev")},
    )
    assert "kard_obqa_kard" in names and "kard_obqa_kard_eval" in names

    out = tmp_path / "task_cache"
    (m_train,) = run.materialize(task="kard_obqa_kard", out_dir=str(out), num_shards=4)
    (m_dev,) = run.materialize(task="kard_obqa_kard_eval", out_dir=str(out), splits=["validation"], num_shards=4)
    expected_kept = sum(len([r for r in kept[e.id] if r.strip()]) for e in train)
    assert report.kept == expected_kept > NUM_TRAIN  # several rationales kept per question
    assert m_train["examples"] == expected_kept
    assert m_dev["examples"] == NUM_DEV

    cache.use_cache_dir(out, "kard_obqa_kard", "train")
    task = seqio.get_mixture_or_task("kard_obqa_kard")
    per_host = [[e for e in task.get_dataset(split="train", use_cached=True, shuffle=False,
                                             shard_info=seqio.ShardInfo(i, 4)).as_numpy_iterator()] for i in range(4)]
    ids = [e["id"].decode() for host in per_host for e in host]
    assert len(ids) == len(set(ids)) == expected_kept
    per_question = collections.Counter(i.split("#")[0] for i in ids)
    assert per_question == collections.Counter({e.id: len(kept[e.id]) for e in train if kept[e.id]})
    for host in per_host:
        for e in host:
            assert len(e["passage_ids"]) == N_PASSAGES and len(e["inputs"]) <= 512 and e["inputs"][-1] == 1
            assert b"\nKnowledge: " in e["inputs_pretokenized"]
            assert e["inputs_pretokenized"].endswith(b"\nExplanation:")
    print(f"\nOBQA subset: train {NUM_TRAIN} questions -> {m_train['examples']} kard examples "
          f"({m_train['examples_per_second']:.0f} ex/s materialized, records built in "
          f"{m_train['record_build_seconds']:.1f}s); validation {NUM_DEV} questions -> "
          f"{m_dev['examples']} kard_eval examples ({m_dev['examples_per_second']:.0f} ex/s); "
          f"setup {setup_s:.1f}s; filter: {report.summary()}")
