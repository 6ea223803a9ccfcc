"""One question query for every stage: the `kard_eval` task's inputs equal `infer`'s for the same
examples (retrieval included), and the reranker's training queries and candidates come from the
query the retrieval cache used; a different query form is refused."""
import json

import pytest

seqio = pytest.importorskip("seqio")

from kard_jax.data.query import question_query  # noqa: E402
from kard_jax.data.readers import read_examples  # noqa: E402
from kard_jax.demo import world as world_lib  # noqa: E402
from kard_jax.errors import InputError  # noqa: E402
from kard_jax.inference import passages, pipeline  # noqa: E402
from kard_jax.knowledge import retrieval_cache, run as knowledge  # noqa: E402
from kard_jax.tasks import registry, vocab  # noqa: E402
from kard_jax.teacher.store import write_rationales  # noqa: E402
from kard_jax.tokenizer import Tokenizer  # noqa: E402
from kard_jax.data import prompts  # noqa: E402

FORM = "question_options"  # not the default, so a stage that ignores the setting shows
N_PASSAGES, INPUT_LENGTH = 2, 150


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    world = world_lib.generate(world_lib.WorldConfig(num_train_entities=6, num_test_entities=3, seed=1))
    world_dir = world_lib.write_world(root / "world", world_lib.WorldConfig(num_train_entities=6,
                                                                            num_test_entities=3, seed=1))
    rationales = {q.id: [world_lib.fact_sentence(q.entity, q.attribute, q.options[q.answer])
                         + f" So the answer is ({'ABCD'[q.answer]}) {q.options[q.answer]}."] for q in world["train"]}
    write_rationales(root / "teacher", rationales, {"teacher": "test"})
    knowledge.build_kb(corpus_paths=[str(world_dir / "kb.jsonl")], kb_dir=str(root / "kb"), show_progress=False)
    config = retrieval_cache.RetrievalConfig(rationale_top_k=2, question_top_k=4, query_form=FORM)
    for split, rats in (("train", str(root / "teacher")), ("test", None)):
        knowledge.retrieve(examples_path=str(world_dir / f"{split}.jsonl"), kb_dir=str(root / "kb"),
                           output_dir=str(root / f"retrieval_{split}"), rationales_path=rats, dataset="demo",
                           config=config, show_progress=False)
    vocab_dir = vocab.train_sentencepiece(output_dir=str(root / "vocab"), corpus_paths=[str(world_dir / "kb.jsonl")],
                                          dataset_paths=[str(world_dir / "train.jsonl")], vocab_size=200,
                                          hard_vocab_limit=False, show_progress=False)
    return root, world_dir, vocab_dir


def _register(root, world_dir, vocab_dir, **kwargs):
    return registry.register_kard_tasks(
        "qc", train_path=str(world_dir / "train.jsonl"), vocab_path=str(vocab_dir),
        rationales_path=str(root / "teacher"), retrieval_cache_dir=str(root / "retrieval_train"),
        kb_dir=str(root / "kb"), n_passages=N_PASSAGES, input_length=INPUT_LENGTH, target_length=48,
        eval_paths={"test": str(world_dir / "test.jsonl")},
        eval_retrieval_cache_dirs={"test": str(root / "retrieval_test")}, prompt_template="science", **kwargs)


def _records(name, split):
    ds = seqio.get_mixture_or_task(name).source.get_dataset(split=split, shuffle=False)
    return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in r.items()} for r in ds.as_numpy_iterator()]


def test_kard_eval_inputs_equal_infer_inputs(setup):
    root, world_dir, vocab_dir = setup
    _register(root, world_dir, vocab_dir)
    records = {r["question_id"]: r["inputs"] for r in _records("kard_qc_kard_eval", "test")}
    examples = read_examples(world_dir / "test.jsonl", format="kard", dataset="demo")
    kb = passages.KnowledgeBase(root / "kb")
    fetched = passages.passages_from(kb, passages.bm25_ranker(kb, N_PASSAGES, FORM), N_PASSAGES)(examples)
    inputs = pipeline.student_inputs(examples, fetched, tokenizer=Tokenizer(vocab_dir), input_length=INPUT_LENGTH,
                                     template=prompts.template_for("science"))
    assert len(records) == len(examples) == 18
    assert all("Knowledge: " in text for text in inputs)
    assert {e.id: text for e, text in zip(examples, inputs)} == records


def test_reranker_queries_and_candidates_use_the_cache_query(setup):
    root, world_dir, vocab_dir = setup
    _register(root, world_dir, vocab_dir)
    examples = {e.id: e for e in read_examples(world_dir / "train.jsonl", format="kard", dataset="demo")}
    kb = passages.KnowledgeBase(root / "kb")
    rows = _records("kard_qc_reranker", "train")
    assert rows
    for row in rows:
        example = examples[row["question_id"]]
        assert row["query"] == question_query(example, FORM)
        top = kb.ids(passages.bm25_ranker(kb, 4, FORM)([example])[0])
        assert set(top) <= {c.decode() if isinstance(c, bytes) else c for c in row["candidate_ids"]}


def test_a_different_query_form_is_refused(setup):
    root, world_dir, vocab_dir = setup
    _register(root, world_dir, vocab_dir, query_form="question")
    with pytest.raises(InputError, match="query_form"):
        _records("kard_qc_reranker", "train")


def test_reranker_records_keep_only_the_selected_candidates(setup):
    root, world_dir, vocab_dir = setup
    _register(root, world_dir, vocab_dir, reranker_max_candidates=3, reranker_holdout_fraction=0.3)
    train, held = _records("kard_qc_reranker", "train"), _records("kard_qc_reranker", "validation")
    assert train and held
    assert not {r["question_id"] for r in train} & {r["question_id"] for r in held}
    for row in train + held:
        assert len(row["candidates"]) == 3
        labels = list(row["labels"])
        assert labels == sorted(labels, reverse=True)
    cache = {json.loads(line)["question_id"]: json.loads(line) for line in
             (root / "retrieval_train" / "question_candidates-00000-of-00001.jsonl").read_text().splitlines()}
    for row in train:  # the best-labelled candidate (the rationale's passage) is always kept
        full = cache[row["question_id"]]["labels"][str(row["rationale_index"])]
        assert max(row["labels"]) == pytest.approx(max(full))


def test_question_candidate_pool_keeps_only_the_questions_own_retrieved_list(setup):
    """CANDIDATE_POOL='question': a reranker record's candidates are the question's own retrieved
    list (question_top_k, what inference reranks), never a rationale-only extra; 'union' keeps the
    extras. Labels and lexical features stay aligned with the candidates they belong to."""
    root, world_dir, vocab_dir = setup
    cache = {json.loads(line)["question_id"]: json.loads(line) for line in
             (root / "retrieval_train" / "question_candidates-00000-of-00001.jsonl").read_text().splitlines()}
    assert any(len(row["candidate_ids"]) > 4 for row in cache.values()), "the fixture needs rationale extras"

    def ids(row):
        return [c.decode() if isinstance(c, bytes) else c for c in row["candidate_ids"]]

    _register(root, world_dir, vocab_dir, reranker_candidate_pool="union")
    union = _records("kard_qc_reranker", "train")
    _register(root, world_dir, vocab_dir, reranker_candidate_pool="question")
    question = _records("kard_qc_reranker", "train")
    assert len(union) == len(question)
    extras = 0
    for u, q in zip(union, question):
        full = cache[q["question_id"]]
        own = full["candidate_ids"][:4]
        assert set(ids(q)) == set(own)
        extras += len(set(ids(u)) - set(own))
        labels = full["labels"][str(q["rationale_index"])]
        for cid, label in zip(ids(q), q["labels"]):
            assert label == pytest.approx(labels[full["candidate_ids"].index(cid)])
    assert extras > 0  # the union pool does use the rationales' extras
    with pytest.raises(InputError, match="reranker_candidate_pool"):
        _register(root, world_dir, vocab_dir, reranker_candidate_pool="rationale")
