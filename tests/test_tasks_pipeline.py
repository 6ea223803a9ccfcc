"""seqio tasks on a two-question fixture: exact strings, tokens, truncation, reranker features,
metrics, materialized shards read by 4 hosts, resumable iterator, train/inference prompt parity,
and clear errors on bad input."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from kard_jax.data import prompts  # noqa: E402
from kard_jax.data.example import Example  # noqa: E402
from kard_jax.errors import InputError  # noqa: E402
from kard_jax.knowledge.passage_store import build_passage_store  # noqa: E402
from kard_jax.tasks import cache, feature_converters, registry, run, vocab as vocab_lib  # noqa: E402
from kard_jax.tasks.batch_iterator import SeqioBatchIterator  # noqa: E402
from kard_jax.teacher.store import write_rationales  # noqa: E402

INSTR = prompts.template_for("obqa").instruction
Q1 = "Question: What do plants need to grow? A. sunlight B. rocks C. plastic D. noise"
Q2 = "Question: Which is a metal? A. wood B. iron C. glass D. water"
KB = [
    {"id": "p_sun", "title": "Sun", "text": "The sun gives light and heat to the earth."},
    {"id": "p_plant", "title": "Plant", "text": "Plants use sunlight, water and air to grow food."},
    {"id": "p_iron", "title": "Iron", "text": "Iron is a strong metal that can rust in wet air."},
    {"id": "p_rock", "title": "Rock", "text": "A rock is a solid made of minerals."},
    {"id": "p_glass", "title": "Glass?", "text": "Glass is made by melting sand."},
]
RATIONALES = {
    "q1": ["Plants make food from sunlight.\nSo the answer is A.", "", "Sunlight gives plants energy to grow.",
           "Without light a plant cannot grow."],
    "q2": ["Iron is a metal found in rocks.", "Wood, glass and water are not metals but iron is."],
}
# Hand-written retrieval cache (documented format): top passages per kept rationale, and per
# question the candidates with each rationale's BM25 label.
RATIONALE_ROWS = [
    {"question_id": "q1", "rationale_index": 0, "passage_ids": ["p_sun", "p_plant", "p_rock"], "scores": [3.0, 2.0, 1.0]},
    {"question_id": "q1", "rationale_index": 2, "passage_ids": ["p_plant", "p_sun", "p_rock"], "scores": [4.0, 1.5, 0.5]},
    {"question_id": "q1", "rationale_index": 3, "passage_ids": ["p_plant", "p_rock", "p_sun"], "scores": [2.5, 0.7, 0.2]},
    {"question_id": "q2", "rationale_index": 0, "passage_ids": ["p_iron", "p_rock", "p_glass"], "scores": [5.0, 2.0, 0.1]},
    {"question_id": "q2", "rationale_index": 1, "passage_ids": ["p_glass", "p_iron", "p_sun"], "scores": [3.0, 2.9, 0.0]},
]
QUESTION_ROWS = [
    {"question_id": "q1", "candidate_ids": ["p_plant", "p_rock", "p_sun"], "question_scores": [2.0, 1.0, 0.5],
     "labels": {"0": [2.0, 1.0, 3.0], "2": [4.0, 0.5, 1.5], "3": [2.5, 0.7, 0.2]}},
    {"question_id": "q2", "candidate_ids": ["p_rock", "p_iron", "p_glass"], "question_scores": [1.2, 1.1, 0.3],
     "labels": {"0": [2.0, 5.0, 0.1], "1": [0.0, 2.9, 3.0]}},
]
EVAL_ROWS = [
    {"question_id": "q1", "candidate_ids": ["p_rock", "p_plant"], "question_scores": [2.0, 1.0], "labels": {}},
    {"question_id": "q2", "candidate_ids": ["p_iron", "p_glass"], "question_scores": [2.0, 1.0], "labels": {}},
]


def _write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_cache(directory: pathlib.Path, question_rows, rationale_rows=()) -> str:
    directory.mkdir()
    files = ["question_candidates-00000-of-00001.jsonl"]
    _write_jsonl(directory / files[0], question_rows)
    if rationale_rows:
        files.append("rationale_retrieval-00000-of-00001.jsonl")
        rows = [dict(r, rationale=RATIONALES[r["question_id"]][r["rationale_index"]].strip()) for r in rationale_rows]
        _write_jsonl(directory / files[1], rows)
    (directory / "manifest.json").write_text(json.dumps({"format": "kard_jax.retrieval_cache/1", "files": files}))
    return str(directory)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("kard_tasks")
    questions = [
        {"id": "q1", "sent1": "What do plants need to grow?", "sent2": "", "ending0": "sunlight", "ending1": "rocks",
         "ending2": "plastic", "ending3": "noise", "label": 0},
        {"id": "q2", "sent1": "Which is a metal?", "sent2": "", "ending0": "wood", "ending1": "iron",
         "ending2": "glass", "ending3": "water", "label": 1},
    ]
    train = _write_jsonl(root / "train.jsonl", questions)
    dev = _write_jsonl(root / "dev.jsonl", questions)
    write_rationales(root / "teacher", RATIONALES, {"teacher": "fixture"})
    build_passage_store([_write_jsonl(root / "kb.jsonl", KB)], root / "kb", show_progress=False)
    # A tiny vocabulary trained on generated text from the fixture's words.
    words = " ".join([json.dumps(questions), json.dumps(KB), json.dumps(RATIONALES), INSTR]).replace('"', " ").split()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, size=12)) for _ in range(400)]
    _write_jsonl(root / "corpus.jsonl", [{"text": t} for t in corpus])
    vocab_lib.train_sentencepiece(output_dir=str(root / "vocab"), corpus_paths=[str(root / "corpus.jsonl")],
                                  vocab_size=200, hard_vocab_limit=False, show_progress=False)
    paths = dict(
        train_path=str(train),
        vocab_path=str(root / "vocab"),
        rationales_path=str(root / "teacher"),
        retrieval_cache_dir=_write_cache(root / "retrieval", QUESTION_ROWS, RATIONALE_ROWS),
        kb_dir=str(root / "kb"),
        eval_paths={"validation": str(dev)},
        eval_retrieval_cache_dirs={"validation": _write_cache(root / "retrieval_dev", EVAL_ROWS)},
    )
    names = registry.register_kard_tasks("obqa", n_passages=2, input_length=512, target_length=128, **paths)
    return root, paths, names


def _examples(name, split="train", sequence_length=None):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(sequence_length=sequence_length, split=split, shuffle=False)
    return list(ds.as_numpy_iterator())


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def test_registered_names(fixture):
    assert fixture[2] == ["kard_obqa_ft", "kard_obqa_rd", "kard_obqa_kard", "kard_obqa_reranker", "kard_obqa_kard_eval"]


def test_ft_task_strings(fixture):
    got = [(_text(e["inputs_pretokenized"]), _text(e["targets_pretokenized"])) for e in _examples("kard_obqa_ft")]
    assert got == [
        (f"{INSTR}\n{Q1}\nExplanation:", "Answer: A"),
        (f"{INSTR}\n{Q2}\nExplanation:", "Answer: B"),
    ]


def test_rd_task_one_example_per_kept_rationale(fixture):
    got = [(_text(e["id"]), _text(e["inputs_pretokenized"]), _text(e["targets_pretokenized"]))
           for e in _examples("kard_obqa_rd")]
    p1, p2 = f"{INSTR}\n{Q1}\nExplanation:", f"{INSTR}\n{Q2}\nExplanation:"
    assert got == [
        ("q1#r0", p1, "Plants make food from sunlight.\nSo the answer is A.\nAnswer: A"),
        ("q1#r2", p1, "Sunlight gives plants energy to grow.\nAnswer: A"),
        ("q1#r3", p1, "Without light a plant cannot grow.\nAnswer: A"),
        ("q2#r0", p2, "Iron is a metal found in rocks.\nAnswer: B"),
        ("q2#r1", p2, "Wood, glass and water are not metals but iron is.\nAnswer: B"),
    ]
    # Evaluation split of rd: no knowledge, answer-only target.
    dev = _examples("kard_obqa_rd", "validation")
    assert [_text(e["targets_pretokenized"]) for e in dev] == ["Answer: A", "Answer: B"]


def test_kard_task_strings_and_passage_format(fixture):
    got = {_text(e["id"]): (_text(e["inputs_pretokenized"]), _text(e["targets_pretokenized"]),
                            [_text(p) for p in e["passage_ids"]]) for e in _examples("kard_obqa_kard")}
    sun = "Sun. The sun gives light and heat to the earth."
    plant = "Plant. Plants use sunlight, water and air to grow food."
    iron = "Iron. Iron is a strong metal that can rust in wet air."
    glass = "Glass? Glass is made by melting sand."  # no period added after "?"
    assert sorted(got) == ["q1#r0", "q1#r2", "q1#r3", "q2#r0", "q2#r1"]
    assert got["q1#r0"] == (f"{INSTR}\n{Q1}\nKnowledge: {sun} {plant}\nExplanation:",
                            "Plants make food from sunlight.\nSo the answer is A.\nAnswer: A", ["p_sun", "p_plant"])
    assert got["q1#r2"][0] == f"{INSTR}\n{Q1}\nKnowledge: {plant} {sun}\nExplanation:"
    assert got["q2#r1"] == (f"{INSTR}\n{Q2}\nKnowledge: {glass} {iron}\nExplanation:",
                            "Wood, glass and water are not metals but iron is.\nAnswer: B", ["p_glass", "p_iron"])


def test_kard_eval_uses_question_candidates(fixture):
    got = [(_text(e["inputs_pretokenized"]), _text(e["targets_pretokenized"]))
           for e in _examples("kard_obqa_kard_eval", "validation")]
    assert got[1] == (f"{INSTR}\n{Q2}\nKnowledge: Iron. Iron is a strong metal that can rust in wet air. "
                      "Glass? Glass is made by melting sand.\nExplanation:", "Answer: B")
    assert got[0][0].endswith("Knowledge: Rock. A rock is a solid made of minerals. Plant. Plants use sunlight, "
                              "water and air to grow food.\nExplanation:")


def test_tokens_match_vocabulary_and_end_with_eos(fixture):
    root, paths, _ = fixture
    vocab = vocab_lib.load_vocabulary(paths["vocab_path"])
    for e in _examples("kard_obqa_kard", sequence_length={"inputs": 512, "targets": 128}):
        assert e["inputs"].tolist() == vocab.encode(_text(e["inputs_pretokenized"])) + [1]
        assert e["targets"].tolist() == vocab.encode(_text(e["targets_pretokenized"])) + [1]
        assert vocab.decode(e["targets"].tolist()).endswith("Answer: " + "AB"[_text(e["id"]).startswith("q2")])


def test_truncation_keeps_question_and_cue_and_is_maximal(fixture):
    root, paths, _ = fixture
    vocab = vocab_lib.load_vocabulary(paths["vocab_path"])
    count = lambda s: len(vocab.encode(s))  # noqa: E731
    no_knowledge = f"{INSTR}\n{Q1}\nExplanation:"
    budget = count(no_knowledge) + 12  # room for a few knowledge words only
    registry.register_kard_tasks("obqatrunc", prompt_template="obqa", n_passages=3, input_length=budget + 1, target_length=12,
                                 **{**paths, "eval_paths": {}})
    records = {_text(e["id"]): e for e in _examples("kard_obqatrunc_kard")}
    e = records["q1#r0"]
    text = _text(e["inputs_pretokenized"])
    full_knowledge = ("Sun. The sun gives light and heat to the earth. Plant. Plants use sunlight, water and air "
                      "to grow food. Rock. A rock is a solid made of minerals.")
    head, tail = f"{INSTR}\n{Q1}\nKnowledge: ", "\nExplanation:"
    assert text.startswith(head) and text.endswith(tail)
    kept = text[len(head):-len(tail)]
    words = full_knowledge.split(" ")
    n = len(kept.split(" "))
    assert 0 < n < len(words) and kept == " ".join(words[:n])
    assert count(text) <= budget < count(head + " ".join(words[:n + 1]) + tail)
    # Targets: the rationale is cut, "Answer: A" survives, within target_length - 1 tokens.
    target = _text(e["targets_pretokenized"])
    assert target.endswith("\nAnswer: A") and count(target) <= 11
    assert "Plants make food from sunlight.\nSo the answer is A.".startswith(target[: -len("\nAnswer: A")].rstrip())
    assert len(e["inputs"]) <= budget + 1 and e["inputs"][-1] == 1


def test_train_and_inference_prompts_identical(fixture):
    """The seqio eval task and the inference-side builder give the same string."""
    root, paths, _ = fixture
    from kard_jax.knowledge.passage_store import PassageStore

    vocab = vocab_lib.load_vocabulary(paths["vocab_path"])
    store = PassageStore(paths["kb_dir"])
    example = Example(id="q2", question="Which is a metal?", options=("wood", "iron", "glass", "water"), answer=1,
                      dataset="obqa")
    passages = [store[store.index_of(pid)] for pid in ["p_iron", "p_glass"]]
    inference = prompts.build_student_input(
        example, [prompts.format_passage(p.title, p.text) for p in passages], prompts.template_for("obqa"),
        max_tokens=511, count_tokens=lambda s: len(vocab.encode(s)))
    task = _examples("kard_obqa_kard_eval", "validation")[1]
    assert _text(task["inputs_pretokenized"]) == inference


def test_reranker_task_and_feature_converter(fixture):
    root, paths, _ = fixture
    vocab = vocab_lib.load_vocabulary(paths["vocab_path"])
    raw = {(_text(e["id"])): e for e in _examples("kard_obqa_reranker")}
    assert sorted(raw) == ["q1#r0", "q1#r2", "q1#r3", "q2#r0", "q2#r1"]
    e = raw["q2#r1"]
    # Ordered by descending label, so truncation to n candidates keeps the rationale-relevant ones.
    assert [_text(c) for c in e["candidate_ids"]] == ["p_glass", "p_iron", "p_rock"]
    np.testing.assert_allclose(e["labels"], [3.0, 2.9, 0.0])
    # The hybrid reranker's feature: the cache's BM25 question scores (p_rock, p_iron, p_glass)
    # z-scored over the question's list (no question_top_k in this manifest: all of it), reordered
    # with the candidates.
    q = np.array([1.2, 1.1, 0.3])
    z = (q - q.mean()) / q.std()
    np.testing.assert_allclose(e["lexical_scores"], [z[2], z[1], z[0]], rtol=1e-5)
    # The query is the retrieval cache's question query (no query_form recorded: the bare question).
    assert _text(e["query_pretokenized"]) == "Which is a metal?"
    ds = seqio.get_dataset("kard_obqa_reranker", {"query": 64, "candidates": 6, "labels": 4},
                           feature_converters.RerankerFeatureConverter(), "train", shuffle=False)
    batch = [b for b in ds.as_numpy_iterator()][4]  # q2#r1
    assert batch["candidate_tokens"].shape == (4, 6) and batch["query_tokens"].shape == (64,)
    for i, text in enumerate(["Glass? Glass is made by melting sand.",
                              "Iron. Iron is a strong metal that can rust in wet air.",
                              "Rock. A rock is a solid made of minerals."]):
        expected = (vocab.encode(text)[:5] + [1] + [0] * 6)[:6]
        assert batch["candidate_tokens"][i].tolist() == expected
    assert batch["candidate_tokens"][3].tolist() == [0] * 6
    assert batch["candidate_mask"].tolist() == [1, 1, 1, 0]
    np.testing.assert_allclose(batch["labels"], [3.0, 2.9, 0.0, 0.0])
    np.testing.assert_allclose(batch["lexical_scores"], [z[2], z[1], z[0], 0.0], rtol=1e-5)
    assert batch["query_tokens"].tolist() == (vocab.encode("Which is a metal?") + [1] + [0] * 64)[:64]


def test_metrics_accuracy_and_unparsed_counts(fixture):
    task = seqio.get_mixture_or_task("kard_obqa_ft")
    examples = _examples("kard_obqa_ft", "validation")
    outputs = ["Plants need light.\nAnswer: A", "I am not sure."]
    preds = [task.postprocess_fn(o, example=e, is_target=False) for o, e in zip(outputs, examples)]
    targets = [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True) for e in examples]
    assert preds == [0, -1] and targets == [0, 1]
    (metric,) = task.metric_fns
    assert metric(targets, preds) == {"accuracy": 50.0, "num_unparsed": 1.0, "unparsed_rate": 0.5, "num_examples": 2.0}


def test_student_feature_converter_batches(fixture):
    ds = seqio.get_dataset("kard_obqa_rd", {"inputs": 96, "targets": 32},
                           feature_converters.student_feature_converter(), "train", shuffle=False)
    ex = next(ds.as_numpy_iterator())
    assert set(ex) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"}
    assert ex["decoder_input_tokens"][0] == 0
    assert ex["decoder_input_tokens"][1:].tolist() == ex["decoder_target_tokens"][:-1].tolist()
    assert ex["decoder_loss_weights"].tolist() == (ex["decoder_target_tokens"] != 0).astype(int).tolist()


def _ids(task, split, out, shard):
    cache.use_cache_dir(out, task, split)
    ds = seqio.get_mixture_or_task(task).get_dataset(split=split, use_cached=True, shuffle=False, shard_info=shard)
    return [_text(e["id"]) for e in ds.as_numpy_iterator()]


@pytest.mark.parametrize("num_files", [4, 2])
def test_materialized_shards_cover_every_example_once(fixture, tmp_path, num_files):
    root, _, _ = fixture
    out = tmp_path / "cache"
    (manifest,) = run.materialize(task="kard_obqa_kard", out_dir=str(out), num_shards=num_files)
    assert manifest["examples"] == 5 and sum(manifest["examples_per_shard"]) == 5
    info = json.loads((out / "kard_obqa_kard" / "info.train.json").read_text())
    assert info["features"]["inputs"] == {"shape": [None], "dtype": "int32"}
    per_host = [_ids("kard_obqa_kard", "train", out, seqio.ShardInfo(i, 4)) for i in range(4)]
    flat = [i for ids in per_host for i in ids]
    assert sorted(flat) == ["q1#r0", "q1#r2", "q1#r3", "q2#r0", "q2#r1"]  # each exactly once
    assert all(per_host)
    # Cached tokens equal on-the-fly tokens.
    fresh = {_text(e["id"]): e["inputs"].tolist() for e in _examples("kard_obqa_kard")}
    ds = seqio.get_mixture_or_task("kard_obqa_kard").get_dataset(split="train", use_cached=True, shuffle=False)
    for e in ds.as_numpy_iterator():
        assert e["inputs"][:-1].tolist() == fresh[_text(e["id"])][:-1]


def test_materialized_reranker_roundtrip(fixture, tmp_path):
    out = tmp_path / "cache"
    run.materialize(task="kard_obqa_reranker", out_dir=str(out), num_shards=2)
    cache.use_cache_dir(out, "kard_obqa_reranker", "train")
    lengths = {"query": 64, "candidates": 6, "labels": 4}
    conv = feature_converters.RerankerFeatureConverter()
    cached = list(seqio.get_dataset("kard_obqa_reranker", lengths, conv, "train", use_cached=True).as_numpy_iterator())
    fresh = list(seqio.get_dataset("kard_obqa_reranker", lengths, conv, "train").as_numpy_iterator())
    key = lambda b: b["query_tokens"].tobytes() + b["labels"].tobytes()  # noqa: E731
    assert sorted(map(key, cached)) == sorted(map(key, fresh))
    by_key = {key(b): b for b in fresh}
    for b in cached:
        assert b["candidate_tokens"].tolist() == by_key[key(b)]["candidate_tokens"].tolist()


def test_batch_iterator_resumes_and_shards(fixture, tmp_path):
    out = tmp_path / "cache"
    run.materialize(task="kard_obqa_rd", out_dir=str(out), num_shards=2)
    kwargs = dict(task="kard_obqa_rd", split="train", task_feature_lengths={"inputs": 96, "targets": 32},
                  feature_converter=feature_converters.student_feature_converter(), batch_size=2, cache_dir=str(out),
                  seed=7, shard_index=0, num_shards=1)
    first = SeqioBatchIterator(**kwargs)
    batches = [next(first) for _ in range(7)]  # crosses epoch boundaries (5 examples)
    assert batches[0]["encoder_input_tokens"].shape == (2, 96)
    assert first.get_state()["position"] == 7
    resumed = SeqioBatchIterator(**kwargs)
    resumed.set_state({**first.get_state(), "position": 3})
    for want in batches[3:7]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(InputError, match="seed"):
        resumed.set_state({**first.get_state(), "seed": 8})
    # Two hosts, one epoch, no shuffle: together they read every example exactly once.
    seen = []
    for host in range(2):
        it = SeqioBatchIterator(**{**kwargs, "batch_size": 2, "shard_index": host, "num_shards": 2,
                                   "num_epochs": 1, "shuffle": False})
        seen += [b["encoder_input_tokens"][0].tobytes() for b in it]
    fresh = [e["inputs"] for e in _examples("kard_obqa_rd")]
    expected = [np.pad(t, (0, 96 - len(t))).astype(np.int32).tobytes() for t in fresh]
    assert sorted(seen) == sorted(expected)


def test_mixture_of_datasets(fixture):
    root, paths, _ = fixture
    registry.register_kard_tasks("obqamix", prompt_template="obqa", **{**paths, "eval_paths": {}})
    name = registry.register_kard_mixture("kard_mix_rd", ["kard_obqa_rd", "kard_obqamix_rd"], {"kard_obqa_rd": 2.0})
    ds = seqio.get_dataset(name, {"inputs": 96, "targets": 32}, feature_converters.student_feature_converter(),
                           "train", shuffle=True, seed=0, num_epochs=1)
    assert len(list(ds.take(4).as_numpy_iterator())) == 4
    with pytest.raises(InputError, match="kard_nope_rd"):
        registry.register_kard_mixture("kard_bad", ["kard_nope_rd"])


def test_unknown_task_name_is_a_clear_error(fixture, tmp_path):
    with pytest.raises(InputError, match=r"no seqio task or mixture named 'kard_obqa_kardd'.*kard_obqa_kard"):
        run.materialize(task="kard_obqa_kardd", out_dir=str(tmp_path))
    with pytest.raises(InputError, match="register_kard_tasks"):
        SeqioBatchIterator(task="kard_nope", split="train", task_feature_lengths={}, batch_size=1,
                           feature_converter=feature_converters.student_feature_converter(), shard_index=0,
                           num_shards=1)


def test_reading_an_unmaterialized_split_is_a_clear_error(fixture, tmp_path):
    with pytest.raises(InputError, match="not materialized"):
        cache.use_cache_dir(tmp_path, "kard_obqa_kard", "train")


def test_input_length_too_short_for_the_question(fixture):
    root, paths, _ = fixture
    registry.register_kard_tasks("obqashort", prompt_template="obqa", input_length=16, **{**paths, "eval_paths": {}})
    with pytest.raises(InputError, match=r"example 'q1'.*max_tokens=15"):
        _examples("kard_obqashort_ft")


def test_missing_vocabulary_file(fixture, tmp_path):
    _, paths, _ = fixture
    with pytest.raises(InputError, match=r"nowhere: SentencePiece vocabulary not found"):
        registry.register_kard_tasks("obqa2", prompt_template="obqa", **{**paths, "vocab_path": str(tmp_path / "nowhere")})
    with pytest.raises(InputError, match=r"spiece.model: SentencePiece vocabulary not found \(a directory must"):
        vocab_lib.load_vocabulary(tmp_path)


def test_stale_retrieval_cache_is_detected(fixture, tmp_path):
    _, paths, _ = fixture
    rows = [dict(r) for r in RATIONALE_ROWS]
    stale = _write_cache(tmp_path / "stale", QUESTION_ROWS, rows)
    lines = (pathlib.Path(stale) / "rationale_retrieval-00000-of-00001.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "rationale": "A different rationale."})
    (pathlib.Path(stale) / "rationale_retrieval-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n")
    registry.register_kard_tasks("obqastale", prompt_template="obqa", **{**paths, "retrieval_cache_dir": stale, "eval_paths": {}})
    with pytest.raises(InputError, match="stale"):
        _examples("kard_obqastale_kard")
